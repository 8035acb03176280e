"""A 4-layer MTP drafter distilled from the `small` target (train_target_small.py); one GPU.

  python -m experiments.train_drafter --config=configs/train_drafter_small.py \
      --config.target=runs/target_small/target --config.workdir=runs/drafter_small
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.target = "runs/target_small/target"         # target checkpoint (checkpoint.save_params dir)
  c.corpus_dir = "data/stdlib"                  # written by experiments/build_corpus.py
  c.tokenizer = "data/stdlib/tokenizer.model"   # the target's tokenizer
  c.workdir = "runs/drafter_small"              # checkpoints/, metrics.jsonl, run.json, drafter/
  c.resume = True                               # continue from the latest checkpoint in workdir

  c.drafter = ml_collections.ConfigDict()       # arguments of gemma_mtp.drafter.for_target
  c.drafter.embed_dim = 256                     # Da, the drafter's width
  c.drafter.num_heads = 4                       # query heads (a multiple of the target kv heads)
  c.drafter.mlp_dim = 1024                      # GeGLU width
  c.drafter.num_layers = 4                      # layers S, S, S, F (read the target's taps)
  c.drafter.num_centroids = 0                   # 0: dense tied head; else centroid head size C
  c.compute_dtype = "bfloat16"                  # activations of target and drafter

  c.draft_steps = 4                             # drafter steps unrolled per position in the loss
  c.step_weights = (1.0, 1.0, 1.0, 1.0)         # loss weight per draft step (one per step)
  c.loss_type = "kl"                            # 'kl' to the target's distribution, 'ce' to argmax

  c.seq_len = 512                               # T: tokens per training sequence
  c.batch_size = 32                             # B: sequences per step
  c.steps = 3000                                # total optimizer steps of the run
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
  c.export_dtype = "bfloat16"                   # dtype of the exported drafter/ params
  return c
