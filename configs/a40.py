"""One NVIDIA A40 (48 GB): the `large` preset in bfloat16 on GPU-sized cohorts."""

from ehrjax.config import gpu_config


def get_config():
    return gpu_config("a40")
