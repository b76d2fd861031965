"""The reference study's own three fine-tuning runs, as it ran them, beside the sound protocol.

The reference study pre-trained BEHRT by MLM, then fine-tuned a *randomly initialised, frozen* encoder with
LoRA (rank 16 on the attention projections), with the code embeddings (1) trainable, (2) frozen from the MLM
run, (3) frozen from Med2Vec. Here those three runs (`ref_*`) run with CIs and seeds, next to `scratch`,
`mlm_lora`, `med2vec_lora`, the bag-of-codes regression and the oracle, so its users can see their own
comparison and the sound one side by side. (The reference pre-trained and fine-tuned on one cohort; ehrjax keeps
the pre-training and fine-tuning cohorts disjoint.)

    python -m ehrjax.benchmark --config configs/seed_protocol.py
"""

from ehrjax.config import cpu_config
from ehrjax.train.arms import reference_arm


def get_config():
    c = cpu_config("seed_protocol")
    lora = dict(lora=True, lora_rank=16, lora_targets=("q", "k", "v", "o"))
    c.arms.ref_trainable_emb = reference_arm(
        "random frozen encoder + LoRA r16 on attention; code embeddings trainable (reference run 1)",
        trainable=("code_table", "embeddings", "lora", "head"), **lora)
    c.arms.ref_frozen_mlm_emb = reference_arm(
        "random frozen encoder + LoRA r16 on attention; MLM code embeddings frozen (reference run 2)",
        code_table="mlm", trainable=("embeddings", "lora", "head"), **lora)
    c.arms.ref_frozen_med2vec_emb = reference_arm(
        "random frozen encoder + LoRA r16 on attention; Med2Vec code embeddings frozen (reference run 3)",
        code_table="med2vec", trainable=("embeddings", "lora", "head"), **lora)
    c.benchmark.arms = ("logreg,scratch,ref_trainable_emb,ref_frozen_mlm_emb,ref_frozen_med2vec_emb,mlm_lora,"
                        "med2vec_lora,oracle,oracle_visible")
    c.benchmark.roles.table_pairs = "ref_frozen_mlm_emb:ref_frozen_med2vec_emb,mlm_lora:med2vec_lora"
    c.benchmark.roles.trainable_contrast = "ref_trainable_emb"
    c.benchmark.tasks = "heart_failure"
    c.benchmark.train_sizes = "250,1000"
    c.benchmark.pretrain_epochs = 2
    c.benchmark.cuts = "heart failure only; labelled-set sizes 250 and 1,000; 2 epochs of MLM pre-training"
    return c
