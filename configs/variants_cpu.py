r"""Drafter variants on the shipped demo target with tiny budgets: the whole pipeline on a CPU.

  python experiments/variants.py --config=configs/variants_cpu.py

A few distillation steps, 4 short prompts per workload, draft lengths 1 and 2, batches 1 and 2
(~19 programs to compile, a few seconds each on a CPU). Figures from it show that everything
runs, not how good the drafters are.
"""

import importlib.util
import pathlib


def _gpu_config():
  path = pathlib.Path(__file__).with_name("variants_gpu.py")
  spec = importlib.util.spec_from_file_location("variants_gpu", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _gpu_config()
  c.out_dir = "runs/variants_cpu"
  c.dtype = "float32"                   # bf16 matmuls are emulated on CPUs
  c.extra_train_roots = ()              # the stdlib train split is plenty for a few steps
  c.prose_max_bytes = 200_000
  for r in (c.heads, c.self_drafter):
    r.compute_dtype = "float32"
    r.export_dtype = "float32"
    r.seconds = 0.0
    r.steps = 3
    r.seq_len = 128
    r.batch_size = 4
    r.eval_batches = 1
    r.log_every = 1
    r.optimizer.warmup_steps = 1
  c.heads.drafter.num_heads = 2
  c.heads.drafter.mlp_dim = 256
  c.heads.draft_steps = 2
  c.self_drafter.draft_steps = 2
  c.self_drafter.step_weights = (1.0, 1.0)
  c.logit_sequences = 2
  c.logit_seq_len = 128
  c.buckets = (1, 2)
  c.trees = ("2,1",)
  c.batches = (1, 2)
  c.prompts = 4
  c.small_batch_prompts = 2
  c.prompt_len = 64
  c.max_new_tokens = 16
  c.repeats = 1
  c.compile_threads = 0
  return c
