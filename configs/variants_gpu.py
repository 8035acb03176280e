r"""Drafter variants on the shipped (H200-trained) demo target, one H200 in ~6-8 minutes.

  python experiments/variants.py --config=configs/variants_gpu.py \
      --config.record=experiments/results/variants_h200.json

Budget (one H200, 540 s; the first run, with 50 s + 35 s of distillation and batch 1 at the
batch-8 K only, took 277 s): the demo target trains at ~30 ms per 64 x 512-token step; a
parallel-heads step (8 KL terms over the vocabulary) took ~0.47 s and a self-drafter step ~0.33 s
there, so 80 s + 80 s of distillation (each plus ~15 s of compilation, evaluation and export).
The evaluation compiles ~52 programs side by side (plain, and every variant at every draft
length at batch 8 and batch 1), then times 32 + 32 prompts x 128 new tokens per configuration at
batch 8 and 8 + 8 at batch 1.
"""

import ml_collections


def _recipe(kind: str) -> ml_collections.ConfigDict:
  """`train.train_drafter` arguments (the recipe of configs/train_drafter_{heads,self}.py)."""
  r = ml_collections.ConfigDict()
  r.drafter = ml_collections.ConfigDict({"kind": kind})   # drafter_kinds.for_target arguments
  r.loss_type = "kl"                  # KL(target || drafter) at every unrolled draft step
  r.compute_dtype = "bfloat16"        # target and drafter activations (as at inference)
  r.seq_len = 512                     # tokens per training sequence
  r.batch_size = 32                   # sequences per step
  r.steps = 100_000                   # upper bound; the seconds budget decides
  r.seconds = 0.0                     # training time after compilation (calibrated to steps)
  r.seed = 0
  r.log_every = 50
  r.eval_batches = 4                  # held-out batches of the final evaluation
  r.export_dtype = "bfloat16"         # as users load drafters
  r.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.1, weight_decay=0.1, b1=0.9,
      b2=0.95, eps=1e-8, clip_norm=1.0))
  return r


def get_config():
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/variants"      # corpus, distilled drafters, and the record (unless c.record)
  c.record = ""                    # record path; "" = <out_dir>/variants.json
  c.target = ""                    # target / assistant / tokenizer; "" = the shipped demo pair
  c.assistant = ""
  c.tokenizer = ""
  c.dtype = "bfloat16"             # compute dtype of the target (and so of every drafter)

  # The split the demo target was trained on (configs/reproduce_demo.py): the standard library,
  # 2% of its files held out by path hash, plus 40 MB of transformers' source for training only.
  c.corpus_roots = ()
  c.eval_fraction = 0.02
  c.extra_train_roots = ("site-packages/transformers",)
  c.extra_train_max_bytes = 40_000_000
  c.prose_roots = ("site-packages",)  # prose workload: package READMEs / METADATA / .rst
  c.prose_max_bytes = 4_000_000

  c.heads = _recipe("parallel_heads")   # parallel heads: one per draft position up to K = 8
  c.heads.drafter.num_heads = 8
  c.heads.drafter.mlp_dim = 1024
  c.heads.draft_steps = 8               # every head trained
  c.heads.step_weights = ()             # () = weight 1 per head
  c.heads.seconds = 80.0

  c.self_drafter = _recipe("self")      # the target's first N layers + low-rank adapter
  c.self_drafter.drafter.num_layers = 2
  c.self_drafter.drafter.adapter_rank = 64
  c.self_drafter.draft_steps = 4
  c.self_drafter.step_weights = (1.0, 1.0, 1.0, 1.0)
  c.self_drafter.optimizer.weight_decay = 0.0   # the adapter is a correction: no decay
  c.self_drafter.seconds = 80.0

  c.int8_embeddings = False        # int8 target: quantize the tied embedding / head too
  c.logit_sequences = 8            # int8 logit error: held-out code sequences x tokens
  c.logit_seq_len = 512

  c.buckets = (1, 2, 4, 8)         # draft lengths K, each evaluated fixed
  c.trees = ("3,2,1,1", "2,2,1,1,1,1")  # multi-candidate drafting: children per node at each
                                   # depth (21 and 22 drafts in one verify), assistant 'clean'

  c.batches = (1, 8)               # largest: every K; smaller: the K fastest at the largest
  c.prompts = 32                   # per workload (code, prose), at the largest batch
  c.small_batch_prompts = 8        # per workload at the smaller batches
  c.small_batch_all_k = True       # smaller batches: every K (else the K fastest at the largest)
  c.prompt_len = 128
  c.max_new_tokens = 128
  c.repeats = 1                    # timed passes per configuration (best kept)
  c.compile_threads = 12           # programs compiled side by side
  c.seed = 0                       # prompt offsets (0: the demo table's prompts)
  return c
