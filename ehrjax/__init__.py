"""ehrjax: BEHRT pre-training and LoRA fine-tuning on electronic health records, in JAX/Flax."""

__version__ = "0.1.0"
