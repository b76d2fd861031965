"""The CPU default: the `small` preset on cohorts that train in minutes on 2 cores.

    python -m ehrjax.benchmark                       # this config: the whole study in about 10 minutes
    python -m ehrjax.train --config configs/cpu.py --config.task=mlm --config.train.epochs=3   # one MLM run

MLM pre-training uses the copy head (`model.mlm_copy`, set in `cpu_config`): 3 epochs (432 steps, about 3 minutes
on 2 idle cores) reach 0.4 nats below the copy-mixture baseline. The benchmark section is cut to fit 10 minutes on
2 cores (`benchmark.cuts` says what, and the report repeats it); configs/cpu_full.py runs the full grid.
"""

from ehrjax.config import cpu_config


def get_config():
    c = cpu_config("cpu")
    c.benchmark.train_sizes = "250,1000"
    c.benchmark.pretrain_epochs = 2
    c.benchmark.finetune_epochs = 6
    c.benchmark.finetune_patience = 2
    c.benchmark.cuts = (
        "labelled-set sizes 250 and 1,000 (the full grid adds 4,000); "
        "2 epochs of MLM pre-training per table instead of 8; "
        "at most 6 fine-tuning epochs (patience 2) instead of 10 (patience 3)"
    )
    return c
