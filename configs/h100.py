"""One NVIDIA H100 (80 GB): the `large` preset in bfloat16 with twice the A40 batch and cohort."""

from ehrjax.config import gpu_config


def get_config():
    return gpu_config("h100", batch_scale=2)
