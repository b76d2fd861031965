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
    c.benchmark.arms = "logreg,trees,scratch,mlm_lora,oracle,oracle_visible"
    c.benchmark.tasks = "heart_failure"
    c.benchmark.train_sizes = "64,250,1000"
    c.benchmark.pretrain_epochs = 2
    c.benchmark.finetune_max_steps = 150
    c.benchmark.max_val_patients = 1000
    c.benchmark.roles.table_pairs = ""
    c.benchmark.roles.trainable_contrast = ""
    c.benchmark.cuts = (
        "one outcome task, heart_failure unless benchmark.tasks says otherwise (the full grid runs it and "
        "renal_decline, driven by order and timing); "
        "labelled-set sizes 64, 250 and 1,000 (the full grid adds 4,000); "
        "the Med2Vec arms and their pre-training (question 2 is not asked: run configs/cpu_full.py, or add "
        "--config.benchmark.arms=...,med2vec_lora --config.benchmark.roles.table_pairs=mlm_lora:med2vec_lora); "
        "full fine-tuning (mlm_full) and the frozen-embedding arms mlm_emb and med2vec_emb; "
        "2 epochs of MLM pre-training per table instead of 8; "
        "at most 150 fine-tuning steps per run instead of 300; 1,000 validation patients instead of 2,000"
    )
    return c
