"""The CPU default: the `small` preset on cohorts that train in minutes on 2 cores.

    python -m ehrjax.train --config configs/cpu.py --config.task=mlm --config.train.epochs=3

MLM pre-training uses the copy head (`model.mlm_copy`): without it the model learns to copy a code the patient
already has only code by code, and after 3 epochs still predicts rare visible codes at the unigram
(benchmarks/RESULTS.md, "MLM learning speed"). 3 epochs (432 steps) take about 3 minutes on 2 idle cores.
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
    c.model.mlm_copy = True
    c.train.epochs = 8
    return c
