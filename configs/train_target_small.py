"""The `small` preset (~30M params, 32k vocabulary) on the stdlib code corpus; one GPU.

  python -m experiments.build_corpus --out_dir=data/stdlib
  python -m experiments.train_tokenizer --corpus_dir=data/stdlib --vocab_size=32768
  python -m experiments.train_target --config=configs/train_target_small.py \
      --config.workdir=runs/target_small
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.corpus_dir = "data/stdlib"                  # written by experiments/build_corpus.py
  c.tokenizer = "data/stdlib/tokenizer.model"   # written by experiments/train_tokenizer.py
  c.workdir = "runs/target_small"               # checkpoints/, metrics.jsonl, run.json, target/
  c.resume = True                               # continue from the latest checkpoint in workdir

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"                      # a name in gemma_mtp.config.PRESETS
  # Overrides of the preset (None keeps the preset's value). vocab_size defaults to the tokenizer's.
  c.model.vocab_size = config_dict.placeholder(int)
  c.model.embed_dim = config_dict.placeholder(int)
  c.model.num_layers = config_dict.placeholder(int)
  c.model.full_every = config_dict.placeholder(int)   # every n-th layer is full attention
  c.model.num_heads = config_dict.placeholder(int)
  c.model.num_kv_heads = config_dict.placeholder(int)
  c.model.num_global_kv_heads = config_dict.placeholder(int)
  c.model.head_dim = config_dict.placeholder(int)
  c.model.global_head_dim = config_dict.placeholder(int)
  c.model.mlp_dim = config_dict.placeholder(int)
  c.model.sliding_window = config_dict.placeholder(int)
  c.compute_dtype = "bfloat16"                  # activations; master weights are float32

  c.seq_len = 512                               # T: tokens per training sequence
  c.batch_size = 32                             # B: sequences per step
  c.steps = 5000                                # total optimizer steps of the run
  c.seed = 0                                    # init, RNG and data order

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3              # peak AdamW rate
  c.optimizer.warmup_steps = 200                # linear warmup from 0
  c.optimizer.total_steps = c.get_ref("steps")  # cosine decay ends at the last step
  c.optimizer.end_lr_fraction = 0.1             # final rate = peak * this
  c.optimizer.weight_decay = 0.1                # on matrices only
  c.optimizer.b1 = 0.9                          # Adam first moment decay
  c.optimizer.b2 = 0.95                         # Adam second moment decay
  c.optimizer.eps = 1e-8                        # Adam epsilon
  c.optimizer.clip_norm = 1.0                   # global gradient norm clip (0: off)

  c.log_every = 50                              # steps between train records
  c.eval_every = 500                            # steps between evaluations (and at the end)
  c.eval_batches = 8                            # batches of the eval split per evaluation
  c.ckpt_every = 500                            # steps between train-state checkpoints
  c.keep_checkpoints = 2                        # newest complete checkpoints kept
  c.export_dtype = "bfloat16"                   # dtype of the exported target/ params
  return c
