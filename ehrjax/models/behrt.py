"""BEHRT: embeddings -> pre-LN encoder -> MLM / classification heads, with optional LoRA adapters.

Top-level parameter paths, which `ehrjax.train.optimizer.param_labels` maps to partitions:
`embeddings/...` (embeddings), `encoder/...` (encoder), `mlm_head/...` and `classifier/...` (head), and any
`lora_a` / `lora_b` (lora). Base paths are the same with and without LoRA.

The hot path is pure: split once, then jit a function of the states that merges inside::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss(params, rest, batch, positions, key):  # positions: int32[batch, M] masked slots
        logits = mlm_apply(graphdef, params, rest, batch, positions, key=key)
        ...

Dropout draws from the explicit `key` (or an `nnx.Rngs(dropout=key)`); the model holds no RNG state, so
`rest` is empty and no Python-side state changes between calls.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.models.embeddings import BehrtEmbeddings
from ehrjax.models.encoder import Encoder, split_key, stack_layers, unstack_layers
from ehrjax.models.heads import ClassifierHead, MlmHead, gather_positions
from ehrjax.models.lora import LORA_TARGETS, add_lora, validate_lora_config

COMPUTE_DTYPES: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POSITION_TYPES: tuple[str, ...] = ("sinusoidal", "learned")
ATTENTION_IMPLS: tuple[str | None, ...] = ("xla", "cudnn", None, "pallas")
INPUT_KEYS: tuple[str, ...] = ("codes", "ages", "visits", "segment_ids")
CODE_TABLE_PATH: tuple[str, ...] = ("embeddings", "code", "embedding")  # where the code table lives


def path_names(path: tuple) -> tuple[str, ...]:
    """Key names of a jax tree path into an `nnx.State` (dict keys, sequence indices, attributes), dropping a
    trailing `.value` of a Variable: `('encoder', 'layers', '0', 'attn', 'q', 'kernel')`."""
    out = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            out.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            out.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                out.append(key.name)
        else:
            out.append(str(key))
    return tuple(out)


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors naming the bad `model.*` key."""
    for key in ("embed_dim", "hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_visits"):
        value = cfg[key]
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    if cfg.hidden_dim % cfg.num_heads:
        raise ValueError(f"model.hidden_dim={cfg.hidden_dim} is not divisible by model.num_heads={cfg.num_heads}")
    if cfg.age_bucket_months <= 0 or cfg.max_age_months <= 0:
        raise ValueError(
            f"model.age_bucket_months and model.max_age_months must be > 0, "
            f"got {cfg.age_bucket_months!r} and {cfg.max_age_months!r}"
        )
    if cfg.position not in POSITION_TYPES:
        raise ValueError(f"model.position {cfg.position!r} unknown; expected one of {POSITION_TYPES}")
    if cfg.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype {cfg.dtype!r} unknown; expected one of {tuple(COMPUTE_DTYPES)}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl {cfg.attention_impl!r} unknown; expected one of {ATTENTION_IMPLS}")
    for key in ("dropout", "attention_dropout"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ValueError(f"model.{key} must be in [0, 1), got {cfg[key]!r}")
    if cfg.attention_impl in ("cudnn", "pallas") and cfg.attention_dropout > 0:
        raise ValueError(
            f"model.attention_impl={cfg.attention_impl!r} has no attention dropout; set model.attention_dropout=0 "
            f"(got {cfg.attention_dropout}) or model.attention_impl='xla'"
        )


def validate_lora_dims(lora_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> None:
    """`lora.*` checks, including `rank <= min(in, out)` of every targeted layer, before any weight is drawn."""
    validate_lora_config(lora_cfg)
    hidden, mlp = model_cfg.hidden_dim, model_cfg.mlp_dim
    dims = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden)}
    dims |= {"mlp_in": (hidden, mlp), "mlp_out": (mlp, hidden)}
    for target in (t for t in LORA_TARGETS if t in lora_cfg.targets):
        d_in, d_out = dims[target]
        if lora_cfg.rank > min(d_in, d_out):
            raise ValueError(
                f"lora.rank={lora_cfg.rank} exceeds min(in, out)={min(d_in, d_out)} of target {target!r} "
                f"({d_in} -> {d_out})"
            )


class Behrt(nnx.Module):
    """BEHRT encoder with an MLM head (`mlm_head=True`) and/or a classifier (`num_labels > 0`).

    model_cfg: `ehrjax.config.model_config(...)`; vocab_size: len(Vocab); lora_cfg: `config.lora` to attach
    adapters (drawn after every base parameter, so base weights match a LoRA-free model of the same seed).
    causal: attention on the earlier tokens of each patient only, and a copy head that points at them only
    (next-code pre-training); the parameters are those of the bidirectional model.
    """

    def __init__(
        self,
        model_cfg: ml_collections.ConfigDict,
        vocab_size: int,
        *,
        num_labels: int = 0,
        lora_cfg: ml_collections.ConfigDict | None = None,
        mlm_head: bool = True,
        causal: bool = False,
        rngs: nnx.Rngs,
    ):
        validate_model_config(model_cfg)
        if lora_cfg is not None:
            validate_lora_dims(lora_cfg, model_cfg)
        if vocab_size <= NUM_SPECIAL:
            raise ValueError(f"vocab_size={vocab_size} must exceed the {NUM_SPECIAL} special tokens")
        if num_labels < 0:
            raise ValueError(f"num_labels must be >= 0, got {num_labels}")
        dtype = COMPUTE_DTYPES[model_cfg.dtype]
        self.vocab_size = vocab_size
        self.num_labels = num_labels
        self.embeddings = BehrtEmbeddings(model_cfg, vocab_size, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(model_cfg, dtype=dtype, causal=causal, rngs=rngs)
        self.mlm_head = nnx.data(None)
        if mlm_head:
            self.mlm_head = MlmHead(
                model_cfg.hidden_dim,
                model_cfg.embed_dim,
                vocab_size,
                tied=bool(model_cfg.tie_mlm),
                copy=bool(model_cfg.mlm_copy),
                causal=causal,
                dtype=dtype,
                rngs=rngs,
            )
        self.classifier = nnx.data(None)
        if num_labels:
            self.classifier = ClassifierHead(
                model_cfg.hidden_dim, num_labels, dropout=model_cfg.dropout, dtype=dtype, rngs=rngs
            )
        if lora_cfg is not None:
            add_lora(self, lora_cfg, rngs.params())

    def encode(
        self,
        codes: jax.Array,
        ages: jax.Array,
        visits: jax.Array,
        segment_ids: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """codes, ages, visits, segment_ids: int32[batch, seq] -> hidden f[batch, seq, hidden_dim].

        Output rows at padding (segment_ids == 0) are finite and meaningless. `rngs` (an `nnx.Rngs` with a
        `dropout` stream, or a key) is needed only when `deterministic=False`.
        """
        key = _dropout_key(rngs, deterministic)
        k_embed, k_encoder = split_key(key, 2)
        x = self.embeddings(codes, ages, visits, deterministic=deterministic, rngs=k_embed)
        return self.encoder(x, segment_ids, deterministic=deterministic, rngs=k_encoder)

    def mlm_logits(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        codes: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """hidden: f[batch, seq, H], positions: int32[batch, M] -> f32[batch, M, vocab].

        Gathers the M selected positions first, then projects (padding slots give ignorable logits). With the
        copy head (`model.mlm_copy`) the result is the mixture's log-probabilities and `codes` (the masked
        input) and `segment_ids`, int32[batch, seq], are needed.
        """
        if self.mlm_head is None:
            raise ValueError("this Behrt was built with mlm_head=False")
        h = gather_positions(hidden, positions)
        logits = self.mlm_head(h, self.embeddings.code)
        if self.mlm_head.copy is None:
            return logits
        if codes is None or segment_ids is None:
            raise ValueError("model.mlm_copy: mlm_logits needs the masked input codes and segment_ids")
        return self.mlm_head.copy(h, hidden, positions, codes, segment_ids, logits)

    def classify(
        self,
        hidden: jax.Array,
        cls_index: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """hidden: f[batch, seq, H], cls_index: int32[batch, S] (each segment's `[CLS]`) -> f32[batch, S, labels]."""
        if self.classifier is None:
            raise ValueError("this Behrt was built with num_labels=0")
        key = _dropout_key(rngs, deterministic)
        return self.classifier(gather_positions(hidden, cls_index), deterministic=deterministic, rngs=key)


def _dropout_key(rngs: nnx.Rngs | jax.Array | None, deterministic: bool) -> jax.Array | None:
    if deterministic:
        return None
    if rngs is None:
        raise ValueError("deterministic=False needs rngs (an nnx.Rngs with a 'dropout' stream, or a key)")
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    return rngs


def mlm_apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Mapping[str, jax.Array],
    positions: jax.Array,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Pure MLM forward: batch with `codes, ages, visits, segment_ids` -> f32[batch, M, vocab].

    `key=None` is deterministic (eval); a key turns dropout on (training).
    """
    model = nnx.merge(graphdef, params, rest)
    hidden = model.encode(*(batch[k] for k in INPUT_KEYS), deterministic=key is None, rngs=key)
    return model.mlm_logits(hidden, positions, batch["codes"], batch["segment_ids"])


def classify_apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Mapping[str, jax.Array],
    cls_index: jax.Array,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Pure classification forward -> f32[batch, S, num_labels]; `key=None` is deterministic."""
    model = nnx.merge(graphdef, params, rest)
    k_encode, k_head = split_key(key, 2)
    hidden = model.encode(*(batch[k] for k in INPUT_KEYS), deterministic=key is None, rngs=k_encode)
    return model.classify(hidden, cls_index, deterministic=key is None, rngs=k_head)


def load_pretrained(model: nnx.Module, params: nnx.State) -> dict[str, list[str]]:
    """Copy every parameter of `params` whose path exists in `model`, in place; shapes must match.

    For pre-training -> fine-tuning: a pretrained state (no LoRA, with an MLM head) loads into a LoRA model
    with a classifier. The encoder layer layout (list vs scan) is converted when the two differ. Returns
    `{'loaded': [...], 'missing': [...], 'unused': [...]}` paths: `missing` are model params left at their
    init (adapters, new heads), `unused` are params of `params` the model has no place for.
    """
    own = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    incoming = params
    own_scan = not any(len(p) > 2 and p[:2] == ("encoder", "layers") and isinstance(p[2], int) for p in own)
    flat_in = dict(nnx.to_flat_state(incoming))
    in_scan = not any(len(p) > 2 and p[:2] == ("encoder", "layers") and isinstance(p[2], int) for p in flat_in)
    if own_scan and not in_scan:
        flat_in = dict(nnx.to_flat_state(stack_layers(incoming)))
    elif in_scan and not own_scan:
        flat_in = dict(nnx.to_flat_state(unstack_layers(incoming)))

    loaded = []
    for path, var in flat_in.items():
        if path not in own:
            continue
        if var.shape != own[path].shape:
            name = "/".join(map(str, path))
            raise ValueError(f"pretrained param {name} has shape {var.shape}, the model expects {own[path].shape}")
        own[path][...] = jnp.asarray(var[...], own[path].dtype)
        loaded.append(path)

    def names(paths: object) -> list[str]:
        return sorted("/".join(map(str, p)) for p in paths)

    return {
        "loaded": names(loaded),
        "missing": names(set(own) - set(flat_in)),
        "unused": names(set(flat_in) - set(own)),
    }
