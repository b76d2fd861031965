"""The full CPU grid for users with time (several hours on 2 cores; not timed since every neural arm tunes three
learning rates): every arm, both outcome tasks, labelled-set sizes from 64 to 4,000 patients, three
replicates, full-length pre-training.

    python -m ehrjax.benchmark --config configs/cpu_full.py
"""

from ehrjax.config import cpu_config


def get_config():
    c = cpu_config("cpu_full")
    c.benchmark.train_sizes = "64,250,1000,4000"
    c.benchmark.pretrain_epochs = 8
    return c
