"""The configuration schema: every key ehrjax reads, with its default.

Files in `configs/` start from `base_config()` and override values; `ml_collections` rejects unknown keys
given on the command line (`--config.data.row_len=256`). Model size presets follow the reference study.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from ehrjax.train.arms import default_arms

# embed_dim / hidden_dim / num_layers / num_heads / mlp_dim (the reference study's intermediate size is
# 2 x hidden for its presets).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=16, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64),
    "small": dict(embed_dim=64, hidden_dim=128, num_layers=2, num_heads=4, mlp_dim=256),
    "medium": dict(embed_dim=128, hidden_dim=256, num_layers=4, num_heads=8, mlp_dim=512),
    "large": dict(embed_dim=256, hidden_dim=512, num_layers=6, num_heads=8, mlp_dim=1024),
}


def model_config(preset: str = "small") -> ml_collections.ConfigDict:
    """BEHRT architecture settings for a size preset (`tiny`, `small`, `medium`, `large`)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model preset {preset!r} unknown; expected one of {sorted(MODEL_PRESETS)}")
    m = ml_collections.ConfigDict()
    m.preset = preset
    m.update(MODEL_PRESETS[preset])
    m.dropout = 0.1
    m.attention_dropout = 0.1
    # Random bits per dropout decision (embeddings, residual and attention dropout): 32 = jax.random.bernoulli
    # (nnx.Dropout's mask); 16 or 8 draw narrower ints (cheaper; the rate rounds to a multiple of 2**-bits).
    m.dropout_bits = 32
    m.max_visits = 512  # size of the visit-index position table
    m.age_bucket_months = 12
    m.max_age_months = 110 * 12
    m.position = "sinusoidal"  # 'sinusoidal' (frozen) | 'learned'
    m.scan_layers = False
    m.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
    m.tie_mlm = False
    m.mlm_copy = False  # MLM head mixes in a pointer to the patient's visible codes (ehrjax.models.heads.CopyHead)
    # 'xla' | 'cudnn' | None: passed to jax.nn.dot_product_attention with the dense block-diagonal mask;
    # 'pallas': the Pallas Triton flash-attention kernel with segment ids (GPU; elsewhere 'xla', with a warning).
    # 'cudnn' and 'pallas' have no attention dropout: they need attention_dropout = 0.
    m.attention_impl = "xla"
    m.attention_interpret = False  # pallas: run the kernel in Pallas interpret mode on any platform (slow; tests)
    return m


def lora_config() -> ml_collections.ConfigDict:
    lora = ml_collections.ConfigDict()
    lora.rank = 8
    lora.alpha = 16.0
    lora.targets = ("q", "k", "v", "o")  # any of q, k, v, o, mlp_in, mlp_out
    lora.dropout = 0.0
    return lora


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default; the CPU-sized cohort and the `small` preset."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.output_dir = ""  # '' -> results/<name>-<timestamp>/

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # 'synthetic' (seeded generator) | 'meds' (a MEDS 0.4 dataset, ehrjax.data.meds)
    c.data.meds_dir = ""  # meds: the dataset folder (data/, metadata/); mlm reads every subject
    c.data.meds_pretrain_dir = ""  # meds: a separate dataset for MLM pre-training ('' -> meds_dir)
    c.data.meds_labels = ""  # meds: folder of label parquet files (subject_id, prediction_time, boolean_value)
    c.data.meds_visit_hours = 0.0  # meds: events <= this many hours apart form one visit (0: same timestamp)
    c.data.num_noise_codes = 1000
    c.data.min_count = 1
    c.data.time_tokens = False  # CEHR-BERT gap tokens (W0-W3, M1-M11, LT) between visits; see ehrjax.data.tokenize
    c.data.batching = "pack"  # 'pack' | 'bucket' | 'pad_max' | 'pack_buckets'
    c.data.max_len = 256  # truncation length in tokens, [CLS] and [SEP] included
    c.data.row_len = 256  # pack: tokens per row
    c.data.rows_per_batch = 32  # pack: rows per batch
    c.data.slots_per_row = 16  # pack: patient (CLS / label) slots per row
    c.data.tokens_per_batch = 8192  # bucket, pack_buckets: tokens per batch, a multiple of every row length
    c.data.bucket_min_len = 8  # bucket: shortest bucket (a power of two); buckets double up to max_len
    # pack_buckets: shortest packed row; row lengths double from it while below row_len, then row_len
    # (32 -> 32, 64, 128 at row_len 128). slots_per_row applies to every row length.
    c.data.pack_min_len = 32
    c.data.batch_size = 32  # pad_max: patients per batch
    c.data.mask_prob = 0.15
    c.data.mlm_slot_factor = 1.5  # masked-position slots = factor x mask_prob x tokens per batch

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.num_patients = 20_000
    c.pretrain.seed = 0

    c.finetune = ml_collections.ConfigDict()
    c.finetune.num_patients = 6_000
    c.finetune.seed = 0
    c.finetune.outcome = "heart_failure"
    c.finetune.train_size = 0  # 0 -> every training patient; k -> the first k (nested labeled-set sizes)

    c.task = "mlm"  # 'mlm' | 'clm' (next-code pre-training, causal attention) | 'outcome' | 'next_visit'
    c.arm = "scratch"  # a neural arm of `arms` (what a fine-tuning run starts from and trains)
    c.arms = default_arms()  # name -> code table / encoder source, trainable partitions, LoRA (ehrjax.train.arms)
    c.init_from = ""  # a checkpoint directory of a pre-training run to start from
    c.resume = ""  # a run directory to continue (its config must match)
    c.embeddings_from = ""  # code vectors to import and freeze (Med2Vec .npz, word2vec .txt, .npy, cui2vec .csv,
    # a Hugging Face model folder, an ehrjax export)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 10
    c.train.patience = 3  # epochs without improvement of the validation metric before stopping
    c.train.metric = ""  # '' -> 'loss' for mlm and clm (minimised), 'auroc' for outcome, 'aps' for next_visit
    c.train.checkpoint_every = 200  # steps between 'latest' checkpoints (and at every epoch end)
    c.train.log_every = 50  # steps between host syncs for logging
    c.train.max_eval_patients = 2000  # validation patients scored per evaluation (MLM: held-out patients)
    c.train.tensorboard = False
    c.train.progress = True
    c.train.num_devices = 0  # 0 -> all devices on the 'data' mesh axis
    # Multi-process runs: jax.distributed.initialize() first. The three settings below are detected from
    # SLURM, Open MPI or Kubernetes when left unset; set them to join processes started by hand.
    c.train.distributed = False
    c.train.coordinator_address = ""  # host:port of process 0 ('' = detected, or JAX_COORDINATOR_ADDRESS)
    c.train.num_processes = 0  # 0 = detected
    c.train.process_id = -1  # -1 = detected
    c.train.heartbeat_timeout_s = 100  # a process silent this long ends the whole job with an error
    # A folder for XLA's persistent compilation cache ('' = off): repeated and resumed runs skip recompiling.
    c.train.compilation_cache = ""

    c.model = model_config("small")
    c.lora = lora_config()

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # 'cosine' | 'constant'
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    # Med2Vec (ehrjax.embeddings.med2vec); dims, window, batch and l2 are the original tool's defaults.
    # The med2vec_lora arm needs model.embed_dim == med2vec.dim (the model projects embed_dim -> hidden_dim).
    c.med2vec = ml_collections.ConfigDict()
    c.med2vec.dim = 200  # code representation size (W_emb columns)
    c.med2vec.visit_dim = 200  # visit representation size (W_hidden columns)
    c.med2vec.window = 1  # visits at offsets +-1..window predict each other
    c.med2vec.epochs = 5
    c.med2vec.batch_visits = 1000
    c.med2vec.max_codes = 32  # codes per visit; longer visits keep their most frequent codes (counted)
    c.med2vec.pairs_per_batch = 0  # code pairs per step; 0: enough to see every pair once per epoch
    c.med2vec.optimizer = "adam"  # 'adam' | 'adadelta' (the original's, slow to start)
    c.med2vec.learning_rate = 3e-3
    c.med2vec.l2 = 0.001
    c.med2vec.init_range = 0.0  # 0: Glorot-uniform weights; 0.01: the original's uniform(-0.01, 0.01)
    c.med2vec.seed = 0
    c.med2vec.path = ""  # the benchmark: a user's Med2Vec (or any importer format) file instead of training one
    c.med2vec.codes_path = ""  # its code map when not beside it (e.g. the original tool's X.types)
    c.med2vec.allow_pickle = False  # read a pickled .types map (only with this explicit opt-in)

    # The study (python -m ehrjax.benchmark): lists are comma-separated so they override easily on the CLI.
    c.benchmark = ml_collections.ConfigDict()
    c.benchmark.arms = ("logreg,trees,scratch,mlm_emb,med2vec_emb,mlm_lora,med2vec_lora,mlm_full,oracle,"
                        "oracle_visible")
    c.benchmark.tasks = "heart_failure,renal_decline"  # outcome tasks (ehrjax.data.labels.OUTCOME_TASKS)
    c.benchmark.train_sizes = "64,250,1000,4000"  # labelled-set sizes, nested within each replicate
    # Replicates: each draws its own labelled subset, init and data order (the learning-rate candidates of an
    # arm train with them in one vmapped program).
    c.benchmark.replicates = "0,1,2"
    c.benchmark.pretrain_epochs = 8  # both MLM pre-trainings (learned table, frozen Med2Vec table)
    # The fine-tuning budget, the same for every arm and size: at most this many optimizer steps per run
    # (whole epochs), an evaluation on the validation patients at least every `finetune_eval_steps` steps,
    # early stopping after `finetune_patience` evaluations without a lower validation loss.
    c.benchmark.finetune_max_steps = 300
    c.benchmark.finetune_eval_steps = 10
    c.benchmark.finetune_patience = 3
    c.benchmark.finetune_schedule = "constant"  # after warm-up; early stopping ends a run, not a decay to 0
    c.benchmark.finetune_rows_per_batch = 8  # fine-tuning batches (rows of data.row_len); small sets need steps
    c.benchmark.max_val_patients = 2000  # validation patients every arm is tuned and stopped on
    c.benchmark.ci_half_width = 0.025  # the test-set AUROC 95% half-width the cohort size aims for (reported)
    c.benchmark.probe = True
    # Bootstrap replicates of every CI; Holm can only call m comparisons when 1/(n_boot+1) < 0.05/m.
    c.benchmark.n_boot = 2000
    c.benchmark.cuts = ""  # plain-language note of what a reduced config cut, shown in the report
    # The report's questions name roles, not arms: rename an arm here and the answers follow.
    c.benchmark.roles = ml_collections.ConfigDict()
    c.benchmark.roles.reference = "scratch"
    c.benchmark.roles.pretrained_lora = "mlm_lora"
    c.benchmark.roles.baselines = "logreg,trees"
    c.benchmark.roles.table_pairs = "mlm_lora:med2vec_lora,mlm_emb:med2vec_emb"
    c.benchmark.roles.trainable_contrast = "mlm_emb"  # the "about 7% trainable" arm of the reference study

    # Throughput profile (python -m ehrjax.profile); --modes / --dtypes / --steps / --warmup override.
    c.profile = ml_collections.ConfigDict()
    c.profile.modes = "pack,pack_buckets,bucket,pad_max"  # batching modes to profile
    c.profile.steps = 10  # timed steps per batch shape
    c.profile.warmup = 2  # untimed steps per batch shape, after the ahead-of-time compile
    c.profile.trace_steps = 3  # steps inside jax.profiler.trace with --trace
    c.profile.peak_matmul_size = 2048  # n of the n x n x n jnp.dot that measures a CPU's peak
    return c


def cpu_config(name: str = "cpu") -> ml_collections.ConfigDict:
    """The `small` preset on cohorts that train in minutes on 2 CPU cores."""
    c = base_config()
    c.name = name
    c.pretrain.num_patients = 20_000
    # 62,000 fine-tuning patients: about 4,000 eligible test patients per task (prevalence about 10%), so one
    # test AUROC carries a 95% half-width near 0.025; generating and tokenising them takes seconds.
    c.finetune.num_patients = 62_000
    c.data.max_len = 128
    c.data.row_len = 128
    c.data.rows_per_batch = 32
    c.data.slots_per_row = 16
    # The copy head: without it MLM learns to copy a patient's own codes one code at a time and stays near the
    # copy-mixture baseline for minutes (benchmarks/RESULTS.md, "MLM learning speed").
    c.model.mlm_copy = True
    # No attention dropout, as in the GPU configs (and modern encoders): on this CPU it was 13% of the MLM step
    # (the explicit softmax-dropout path materialises rows x heads x L x L masks), and 3 epochs of MLM reach the
    # same held-out CE without it (benchmarks/RESULTS.md, "Throughput III"). Hidden-state dropout stays at 0.1.
    c.model.attention_dropout = 0.0
    c.train.epochs = 8
    return c


def gpu_config(name: str, batch_scale: int = 1) -> ml_collections.ConfigDict:
    """The `large` preset in bfloat16 on GPU-sized cohorts; `batch_scale` multiplies the A40 batch (48 GB)."""
    c = base_config()
    c.name = name
    c.pretrain.num_patients = 1_000_000 * batch_scale
    c.finetune.num_patients = 150_000
    c.data.num_noise_codes = 20_000
    c.data.max_len = 256
    c.data.row_len = 512
    c.data.rows_per_batch = 128 * batch_scale
    c.data.slots_per_row = 32
    c.data.tokens_per_batch = 65_536 * batch_scale
    c.data.batch_size = 128 * batch_scale
    c.model = model_config("large")
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    # The fused, segment-aware kernel; it has no attention dropout (hidden-state dropout stays at 0.1).
    c.model.attention_impl = "pallas"
    c.model.attention_dropout = 0.0
    c.lora.rank = 16
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 500
    c.train.epochs = 10
    c.train.checkpoint_every = 1000
    c.train.log_every = 100
    c.train.max_eval_patients = 20_000
    c.benchmark.train_sizes = "64,250,1000,4000,16000"
    c.benchmark.replicates = "0,1,2,3,4"
    c.benchmark.pretrain_epochs = 10
    c.benchmark.finetune_max_steps = 1000
    c.benchmark.finetune_rows_per_batch = 32
    c.benchmark.max_val_patients = 5000
    return c


def fill_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (a run's `config.json`) with every key of `base_config()` it lacks set to that
    key's default, section by section: a run written before a key existed reads as the key's default (e.g.
    `model.mlm_copy` False), so code below this edge reads each key as an attribute. Saved values are kept,
    and so are saved keys the schema no longer has."""

    def fill(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        for key, default in defaults.items():
            if key not in out:
                out[key] = default
            elif isinstance(default, dict) and isinstance(out[key], dict):
                out[key] = fill(out[key], default)
        return out

    return fill(saved, json.loads(base_config().to_json()))


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a config file such as `configs/cpu.py` (what `--config` loads, for scripts and tests)."""
    spec = importlib.util.spec_from_file_location(f"ehrjax_config_{Path(path).stem}", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise ValueError(f"config file {path}: not a readable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
