"""Seconds-long runs for tests and CI: the `tiny` preset on small cohorts."""

from ehrjax.config import base_config, model_config


def get_config():
    c = base_config()
    c.name = "smoke"
    c.pretrain.num_patients = 1_500
    c.finetune.num_patients = 1_500
    c.data.num_noise_codes = 200
    c.data.max_len = 64
    c.data.row_len = 64
    c.data.rows_per_batch = 8
    c.data.slots_per_row = 8
    c.data.batch_size = 16
    c.data.tokens_per_batch = 1024
    c.model = model_config("tiny")
    c.model.max_visits = 64
    c.lora.rank = 4
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 10
    c.train.epochs = 3
    c.train.checkpoint_every = 20
    c.train.log_every = 10
    c.train.max_eval_patients = 500
    c.train.progress = False
    c.benchmark.train_sizes = "64,200"
    c.benchmark.replicates = "0,1"
    c.benchmark.pretrain_epochs = 1
    c.benchmark.finetune_max_steps = 24
    c.benchmark.finetune_eval_steps = 6
    c.benchmark.finetune_patience = 2
    c.benchmark.max_val_patients = 300
    c.benchmark.n_boot = 200
    c.benchmark.cuts = ("smoke test: tiny model and cohorts, 1 pre-training epoch, at most 24 fine-tuning steps, "
                        "2 replicates")
    return c
