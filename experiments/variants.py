r"""Drafter variants on one GPU-trained target: distill, quantize, evaluate, one JSON record.

  python experiments/variants.py --config=configs/variants_gpu.py     # one H200, 6-8 min
  python experiments/variants.py --config=configs/variants_cpu.py     # tiny budgets, a CPU

Distills a parallel-heads drafter and a pruned self-drafter for the shipped demo target on its own
train split, quantizes the target to int8 (logit error on held-out code), and compares the
assistant, the heads, the self-drafter, the assistant on the int8 target and the self-drafter on
int8 layers on held-out code and prose: parameters, tokens per target forward, acceptance by
position, speed at batch 1 and 8 (`gemma_mtp/variants.py`). `python experiments/tables.py` prints
the README table of a record copied to experiments/results/variants_h200.json.
"""

from absl import app
from absl import logging
from ml_collections import config_flags

from gemma_mtp import variants

_CONFIG = config_flags.DEFINE_config_file("config", "configs/variants_gpu.py")


def main(argv):
  del argv
  record = variants.run(variants.config_from_dict(_CONFIG.value.to_dict()))
  logging.info("done in %.0f s", record["times"]["total_s"])


if __name__ == "__main__":
  app.run(main)
