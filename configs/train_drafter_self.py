r"""A pruned self-drafter (`gemma_mtp/self_drafter.py`): the target's first layers + its head,
with a low-rank adapter before the final norm, the only weights trained.

`size` picks the target: 'small' (train_target_small.py; one GPU) or 'tiny' (train_target_tiny.py;
CI-sized, float32). An untrained self-drafter (no adapter) needs no run at all:
`experiments/evaluate.py --self_draft_layers=N`.

  python -m experiments.train_drafter --config=configs/train_drafter_self.py \
      --config.target=runs/target_small/target --config.workdir=runs/self_small
  python -m experiments.train_drafter --config=configs/train_drafter_self.py:tiny
"""

import ml_collections


def get_config(size: str = "small") -> ml_collections.ConfigDict:
  if size not in ("small", "tiny"):
    raise ValueError(f"size must be 'small' or 'tiny', got {size!r}")
  small = size == "small"
  c = ml_collections.ConfigDict()
  c.target = f"runs/target_{size}/target"       # target checkpoint (checkpoint.save_params dir)
  c.corpus_dir = "data/stdlib"                  # written by experiments/build_corpus.py
  c.tokenizer = "data/stdlib/tokenizer.model" if small else "data/stdlib/tokenizer_4k.model"
  c.workdir = f"runs/self_{size}"               # checkpoints/, metrics.jsonl, run.json, drafter/
  c.resume = True                               # continue from the latest checkpoint in workdir

  c.drafter = ml_collections.ConfigDict()       # arguments of self_drafter.for_target
  c.drafter.kind = "self"                       # drafter_kinds: the design
  c.drafter.num_layers = 2 if small else 1      # N: target layers the drafter runs (of 8 / 2)
  c.drafter.adapter_rank = 64 if small else 8   # r of the adapter x + (x A) B (B starts at 0)
  c.compute_dtype = "bfloat16" if small else "float32"   # activations of target and drafter

  c.draft_steps = 4 if small else 2             # draft steps per round in the loss
  c.step_weights = (1.0,) * c.draft_steps       # loss weight per draft step
  c.loss_type = "kl"                            # 'kl' to the target's distribution, 'ce' to argmax

  c.seq_len = 512 if small else 64              # T: tokens per training sequence
  c.batch_size = 32 if small else 8             # B: sequences per step
  c.steps = 1000 if small else 50               # total optimizer steps of the run
  c.seed = 0                                    # init, RNG and data order

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3 if small else 3e-3   # peak AdamW rate
  c.optimizer.warmup_steps = 100 if small else 5  # linear warmup from 0
  c.optimizer.total_steps = c.get_ref("steps")  # cosine decay ends at the last step
  c.optimizer.end_lr_fraction = 0.1             # final rate = peak * this
  c.optimizer.weight_decay = 0.0                # the adapter is a correction: no decay
  c.optimizer.b1 = 0.9                          # Adam first moment decay
  c.optimizer.b2 = 0.95                         # Adam second moment decay
  c.optimizer.eps = 1e-8                        # Adam epsilon
  c.optimizer.clip_norm = 1.0                   # global gradient norm clip (0: off)

  c.log_every = 50 if small else 10             # steps between train records
  c.eval_every = 250 if small else 25           # steps between evaluations (and at the end)
  c.eval_batches = 8 if small else 2            # batches of the eval split per evaluation
  c.ckpt_every = 250 if small else 25           # steps between train-state checkpoints
  c.keep_checkpoints = 2                        # newest complete checkpoints kept
  c.export_dtype = "bfloat16" if small else "float32"   # dtype of the exported drafter/ params
  return c
