"""One NVIDIA A40 (48 GB): the `large` preset in bfloat16 on GPU-sized cohorts."""

from ehrjax.config import base_config, model_config


def get_config():
    c = base_config()
    c.name = "a40"
    c.pretrain.num_patients = 1_000_000
    c.finetune.num_patients = 50_000
    c.data.num_noise_codes = 20_000
    c.data.max_len = 256
    c.data.row_len = 512
    c.data.rows_per_batch = 128
    c.data.slots_per_row = 32
    c.data.tokens_per_batch = 65_536
    c.data.batch_size = 128
    c.model = model_config("large")
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.lora.rank = 16
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 500
    c.train.epochs = 10
    c.train.checkpoint_every = 1000
    c.train.log_every = 100
    c.train.max_eval_patients = 20_000
    return c
