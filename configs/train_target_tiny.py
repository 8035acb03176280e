"""A CI-sized target (2 layers, D=64, float32) for about a minute of CPU training on stdlib code.

  python -m experiments.build_corpus --out_dir=data/stdlib
  python -m experiments.train_tokenizer --corpus_dir=data/stdlib --vocab_size=4096 \
      --model_prefix=data/stdlib/tokenizer_4k
  python -m experiments.train_target --config=configs/train_target_tiny.py
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.corpus_dir = "data/stdlib"                  # written by experiments/build_corpus.py
  c.tokenizer = "data/stdlib/tokenizer_4k.model"  # a 4096-piece tokenizer (see the docstring)
  c.workdir = "runs/target_tiny"                # checkpoints/, metrics.jsonl, run.json, target/
  c.resume = True                               # continue from the latest checkpoint in workdir

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"                       # a name in gemma_mtp.config.PRESETS
  # Overrides of the preset (None keeps the preset's value). vocab_size defaults to the tokenizer's.
  c.model.vocab_size = config_dict.placeholder(int)
  c.model.num_layers = 2                        # one sliding and one full attention layer
  c.model.full_every = 2                        # every n-th layer is full attention
  c.model.embed_dim = 64                        # D
  c.model.num_heads = 4                         # query heads
  c.model.num_kv_heads = 2                      # kv heads of sliding layers
  c.model.num_global_kv_heads = 1               # kv heads of full layers
  c.model.head_dim = 16                         # head width of sliding layers
  c.model.global_head_dim = 32                  # head width of full layers
  c.model.mlp_dim = 128                         # GeGLU width
  c.model.sliding_window = 32                   # W
  c.compute_dtype = "float32"                   # activations (CPUs are slow at bfloat16)

  c.seq_len = 64                                # T: tokens per training sequence
  c.batch_size = 8                              # B: sequences per step
  c.steps = 100                                 # total optimizer steps of the run
  c.seed = 0                                    # init, RNG and data order

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3              # peak AdamW rate
  c.optimizer.warmup_steps = 10                 # linear warmup from 0
  c.optimizer.total_steps = c.get_ref("steps")  # cosine decay ends at the last step
  c.optimizer.end_lr_fraction = 0.1             # final rate = peak * this
  c.optimizer.weight_decay = 0.1                # on matrices only
  c.optimizer.b1 = 0.9                          # Adam first moment decay
  c.optimizer.b2 = 0.95                         # Adam second moment decay
  c.optimizer.eps = 1e-8                        # Adam epsilon
  c.optimizer.clip_norm = 1.0                   # global gradient norm clip (0: off)

  c.log_every = 10                              # steps between train records
  c.eval_every = 50                             # steps between evaluations (and at the end)
  c.eval_batches = 2                            # batches of the eval split per evaluation
  c.ckpt_every = 50                             # steps between train-state checkpoints
  c.keep_checkpoints = 2                        # newest complete checkpoints kept
  c.export_dtype = "float32"                    # dtype of the exported target/ params
  return c
