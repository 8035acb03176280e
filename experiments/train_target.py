"""Trains a Gemma 4 target LM on a code corpus (resumes from <workdir>/checkpoints).

  python -m experiments.train_target --config=configs/train_target_tiny.py
  python -m experiments.train_target --config=configs/train_target_small.py \
      --config.workdir=runs/target_small --config.steps=5000
"""

from absl import app
from ml_collections import config_flags

from gemma_mtp import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/train_target_*.py file.",
                                          lock_config=True)


def main(argv):
  del argv
  c = _CONFIG.value
  train.train_target(
      corpus_dir=c.corpus_dir, tokenizer_path=c.tokenizer, workdir=c.workdir,
      model=c.model.preset,
      model_overrides={k: v for k, v in c.model.items() if k != "preset" and v is not None},
      compute_dtype=c.compute_dtype, seq_len=c.seq_len, batch_size=c.batch_size,
      optimizer=train.OptimizerConfig(**c.optimizer.to_dict()), steps=c.steps, seed=c.seed,
      log_every=c.log_every, eval_every=c.eval_every, eval_batches=c.eval_batches,
      ckpt_every=c.ckpt_every, keep_checkpoints=c.keep_checkpoints, resume=c.resume,
      export_dtype=c.export_dtype)


if __name__ == "__main__":
  app.run(main)
