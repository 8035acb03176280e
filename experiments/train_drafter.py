"""Distills a drafter from a frozen target checkpoint (resumes from <workdir>/checkpoints).

The config's `drafter.kind` picks the design ('assistant' when absent; see drafter_kinds.py):

  python -m experiments.train_drafter --config=configs/train_drafter_tiny.py
  python -m experiments.train_drafter --config=configs/train_drafter_small.py \
      --config.target=runs/target_small/target --config.workdir=runs/drafter_small
  python -m experiments.train_drafter --config=configs/train_drafter_heads.py    # parallel heads
  python -m experiments.train_drafter --config=configs/train_drafter_self.py:tiny  # self-drafter
"""

from absl import app
from ml_collections import config_flags

from gemma_mtp import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/train_drafter_*.py file.",
                                          lock_config=True)


def main(argv):
  del argv
  c = _CONFIG.value
  train.train_drafter(
      target_path=c.target, corpus_dir=c.corpus_dir, tokenizer_path=c.tokenizer,
      workdir=c.workdir, drafter=c.drafter.to_dict(), draft_steps=c.draft_steps,
      step_weights=tuple(c.step_weights) or None, loss_type=c.loss_type,
      compute_dtype=c.compute_dtype, seq_len=c.seq_len, batch_size=c.batch_size,
      optimizer=train.OptimizerConfig(**c.optimizer.to_dict()), steps=c.steps, seed=c.seed,
      log_every=c.log_every, eval_every=c.eval_every, eval_batches=c.eval_batches,
      ckpt_every=c.ckpt_every, keep_checkpoints=c.keep_checkpoints, resume=c.resume,
      export_dtype=c.export_dtype)


if __name__ == "__main__":
  app.run(main)
