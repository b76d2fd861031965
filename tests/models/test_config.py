"""Bad model / LoRA settings fail at construction with a one-line error naming the key; preset sizes."""

from __future__ import annotations

import pytest
from behrt_inputs import VOCAB_SIZE
from flax import nnx

from ehrjax.config import MODEL_PRESETS, lora_config, model_config
from ehrjax.models import Behrt
from ehrjax.models.embeddings import num_age_buckets


def build(model_cfg, lora_cfg=None, vocab_size=VOCAB_SIZE, **kwargs):
    """Abstract construction (shapes only, no weights drawn) for the parameter counts."""
    return nnx.eval_shape(lambda: Behrt(model_cfg, vocab_size, lora_cfg=lora_cfg, rngs=nnx.Rngs(0), **kwargs))


def construct(model_cfg, lora_cfg=None, vocab_size=VOCAB_SIZE):
    """Concrete construction: configuration errors are raised before any weight is drawn."""
    return Behrt(model_cfg, vocab_size, lora_cfg=lora_cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("hidden_dim", 33, r"model\.hidden_dim=33 is not divisible by model\.num_heads=2"),
        ("num_heads", 0, r"model\.num_heads must be a positive integer"),
        ("position", "rotary", r"model\.position 'rotary' unknown"),
        ("dtype", "float16", r"model\.dtype 'float16' unknown"),
        ("attention_impl", "flash", r"model\.attention_impl 'flash' unknown"),
        ("dropout", 1.0, r"model\.dropout must be in \[0, 1\)"),
        ("age_bucket_months", 0, r"model\.age_bucket_months"),
    ],
)
def test_bad_model_config(key, value, match):
    cfg = model_config("tiny")
    cfg[key] = value
    with pytest.raises(ValueError, match=match) as err:
        construct(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_fused_attention_refuses_attention_dropout(impl):
    cfg = model_config("tiny")
    cfg.attention_impl, cfg.attention_dropout = impl, 0.1
    with pytest.raises(ValueError, match=rf"model\.attention_impl='{impl}' has no attention dropout") as err:
        construct(cfg)
    assert "\n" not in str(err.value)
    cfg.attention_dropout = 0.0
    construct(cfg)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("rank", 0, r"lora\.rank must be a positive integer, got 0"),
        ("rank", -3, r"lora\.rank must be a positive integer"),
        ("rank", 33, r"lora\.rank=33 exceeds min\(in, out\)=32 of target 'q'"),
        ("targets", ("q", "ffn"), r"lora\.targets has unknown target\(s\) \['ffn'\]"),
        ("targets", (), r"lora\.targets is empty"),
        ("alpha", 0.0, r"lora\.alpha must be > 0"),
        ("dropout", 1.5, r"lora\.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_lora_config(key, value, match):
    lora = lora_config()
    lora[key] = value
    with pytest.raises(ValueError, match=match) as err:
        construct(model_config("tiny"), lora)
    assert "\n" not in str(err.value)


def test_lora_rank_is_checked_against_the_smallest_targeted_layer():
    cfg = model_config("tiny")  # hidden 32, mlp 64
    lora = lora_config()
    lora.targets = ("mlp_in",)
    lora.rank = 32
    build(cfg, lora)  # min(32, 64) = 32: allowed
    lora.rank = 40
    with pytest.raises(ValueError, match=r"lora\.rank=40 exceeds min\(in, out\)=32 of target 'mlp_in'"):
        construct(cfg, lora)


def test_vocab_must_hold_more_than_the_special_tokens():
    with pytest.raises(ValueError, match="vocab_size=5"):
        construct(model_config("tiny"), vocab_size=5)


def test_unknown_preset():
    with pytest.raises(ValueError, match="model preset 'huge' unknown"):
        model_config("huge")


def expected_param_count(
    cfg, vocab: int, num_labels: int = 0, lora_rank: int = 0, lora_targets=(), mlm_head: bool = True
) -> dict:
    """BEHRT's parameter count, written from the architecture independently of the model code."""
    E, H, M, L = cfg.embed_dim, cfg.hidden_dim, cfg.mlp_dim, cfg.num_layers
    ages = cfg.max_age_months // cfg.age_bucket_months + 2
    code_table = vocab * E
    embeddings = (E * H + H if E != H else 0) + ages * H + 2 * H + 2 * H
    if cfg.position == "learned":
        embeddings += cfg.max_visits * H
    attention = 4 * H * H + 3 * H  # q, k, v, o kernels; biases on q, v, o
    mlp = (H * M + M) + (M * H + H)
    layer_norms = 2 * (2 * H)
    encoder = L * (attention + mlp + layer_norms) + 2 * H
    width = E if cfg.tie_mlm else H
    mlm = (H * width + width) + 2 * width + (vocab if cfg.tie_mlm else H * vocab + vocab) if mlm_head else 0
    classifier = (H * H + H) + (H * num_labels + num_labels) if num_labels else 0
    dims = {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "mlp_in": (H, M), "mlp_out": (M, H)}
    lora = L * sum(lora_rank * (dims[t][0] + dims[t][1]) for t in lora_targets)
    return {
        "code_table": code_table,
        "embeddings": embeddings,
        "encoder": encoder,
        "head": mlm + classifier,
        "lora": lora,
    }


def count(model_cfg, vocab: int, **kwargs) -> dict:
    from ehrjax.train.optimizer import parameter_report

    abstract = build(model_cfg, vocab_size=vocab, **kwargs)
    return parameter_report(nnx.state(abstract, nnx.Param)).by_label


def test_preset_parameter_counts_match_the_formula():
    """Printed with `pytest -s`: parameters per preset for a 1,200-code vocabulary, with rank-8 q/k/v/o LoRA."""
    vocab = 1200
    lora = lora_config()
    print(
        f"\n{'preset':<8}{'code table':>12}{'embeddings':>12}{'encoder':>12}{'mlm head':>12}{'lora r8':>10}"
        f"{'total':>12}"
    )
    for preset in MODEL_PRESETS:
        cfg = model_config(preset)
        got = count(cfg, vocab, lora_cfg=lora)
        want = expected_param_count(cfg, vocab, lora_rank=lora.rank, lora_targets=lora.targets)
        assert got == want, preset
        print(
            f"{preset:<8}{got['code_table']:>12,}{got['embeddings']:>12,}{got['encoder']:>12,}{got['head']:>12,}{got['lora']:>10,}"
            f"{sum(got.values()):>12,}"
        )
    assert num_age_buckets(model_config("small")) == 112


@pytest.mark.parametrize("variant", ["tied_learned", "classifier_all_targets", "scan"])
def test_parameter_count_variants(variant):
    cfg = model_config("small")
    lora, kwargs = None, {}
    if variant == "tied_learned":
        cfg.tie_mlm, cfg.position = True, "learned"
    elif variant == "classifier_all_targets":
        lora = lora_config()
        lora.targets = ("q", "k", "v", "o", "mlp_in", "mlp_out")
        kwargs = {"num_labels": 7, "mlm_head": False}
    else:
        cfg.scan_layers = True
    got = count(cfg, 500, lora_cfg=lora, **kwargs)
    lora_kwargs = {"lora_rank": lora.rank, "lora_targets": lora.targets} if lora else {}
    assert got == expected_param_count(cfg, 500, **kwargs, **lora_kwargs)
