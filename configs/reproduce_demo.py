r"""The shipped demo pair: a ~10M-parameter code model (fast on a CPU) and its MTP drafter.

Sized so that the bf16 pair plus tokenizer is about 25 MB and one H200 trains both in ~6 minutes:

  python experiments/reproduce_gpu.py --config=configs/reproduce_demo.py --config.out_dir=runs/demo
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/demo"          # everything is written here (corpus, tokenizer, demo/, records)
  c.vocab_size = 8192              # SentencePiece BPE vocabulary trained on the corpus
  c.seq_len = 512                  # training sequence length
  c.batch_size = 64                # sequences per step
  c.target = dict(                 # ModelConfig fields of the target (vocab from the tokenizer)
      embed_dim=256, layer_types=("sliding",) * 3 + ("full",) + ("sliding",) * 3 + ("full",),
      num_heads=4, num_kv_heads=1, num_global_kv_heads=1, head_dim=64, global_head_dim=128,
      mlp_dim=1024, sliding_window=256, max_seq_len=4096, dtype="bfloat16",
      param_dtype="float32")
  c.drafter = dict(embed_dim=192, num_heads=4, mlp_dim=768, num_layers=2)  # drafter.for_target
  c.target_seconds = 150.0         # training budget of the target (seconds, calibrated to steps)
  c.drafter_seconds = 100.0        # training budget of the drafter
  c.target_lr = 3e-3               # peak learning rates (AdamW, warmup + cosine)
  c.drafter_lr = 3e-3
  c.drafter_steps = 4              # drafter steps unrolled per position in training
  c.drafter_step_weights = (1.0, 0.8, 0.6, 0.4)
  c.eval_prompts = 32              # held-out prompts for acceptance / speed
  c.prompt_len = 128
  c.max_new_tokens = 128
  c.export_dtype = "bfloat16"      # dtype of the shipped weights
  c.measure_speed = True           # speculative vs plain timings (batch 1 and 8, T=0 and 1)
  c.corpus_roots = ()              # () = the running interpreter's standard library
  c.eval_fraction = 0.02           # share of files (by path hash) held out for evaluation
  c.extra_train_roots = ("site-packages/transformers",)  # more training code (train split only)
  c.extra_train_max_bytes = 40_000_000                  # cap on the extra code (0 = all)
  c.target_steps = 0               # > 0: fixed step counts instead of the seconds budgets
  c.drafter_train_steps = 0
  c.full_eval = True               # every fixed draft length, or just K=4 and adaptive
  c.buckets = (1, 2, 4, 8)         # draft lengths evaluated (each fixed, and adaptive among them)
  c.draft_cost = 0.0               # adaptive rule's drafter/target step cost (0: measure it)
  c.conventions = ("hf", "clean")  # drafter attention conventions evaluated
  c.speed_batch = 8                # the larger batch of the speed runs
  c.workload_prompts = 0           # > 0: batch-1 code / prose / mixed workloads of this many prompts
  c.prose_roots = ("site-packages",)  # where the prose workload's .md / .rst / METADATA come from
  c.prose_max_bytes = 4_000_000
  c.workload_calibrate = False     # workloads: the adaptive rule's costs from the fixed-K passes
  c.workload_repeats = 1           # workloads: timed passes per configuration (median reported)
  c.seed = 0
  return c
