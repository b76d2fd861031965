"""BEHRT in Flax NNX: embeddings, pre-LN encoder, MLM / classification heads and LoRA adapters."""

from ehrjax.models.behrt import Behrt, classify_apply, load_pretrained, mlm_apply, validate_model_config
from ehrjax.models.encoder import attention_mask, stack_layers, unstack_layers
from ehrjax.models.lora import LoRADense, add_lora, load_lora, lora_state, merge_lora

__all__ = [
    "Behrt",
    "LoRADense",
    "add_lora",
    "attention_mask",
    "classify_apply",
    "load_lora",
    "load_pretrained",
    "lora_state",
    "merge_lora",
    "mlm_apply",
    "stack_layers",
    "unstack_layers",
    "validate_model_config",
]
