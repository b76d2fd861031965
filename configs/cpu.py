"""The CPU default: the `small` preset on cohorts that train in minutes on 2 cores.

    python -m ehrjax.train --config configs/cpu.py --config.task=mlm
"""

from ehrjax.config import base_config


def get_config():
    c = base_config()
    c.name = "cpu"
    c.pretrain.num_patients = 20_000
    c.finetune.num_patients = 6_000
    c.data.max_len = 128
    c.data.row_len = 128
    c.data.rows_per_batch = 32
    c.data.slots_per_row = 16
    c.train.epochs = 8
    return c
