r"""One command: corpus -> tokenizer -> target -> MTP drafter -> evaluation -> JSON records.

  python experiments/reproduce_gpu.py --config=configs/reproduce_gpu.py   # ~9 min on one H200
  python experiments/reproduce_gpu.py --config=configs/reproduce_demo.py  # the shipped demo pair

Writes <out_dir>/reproduce.json (corpus, sizes, training curves' end points, acceptance by draft
length and attention convention, speculative vs plain speed) and <out_dir>/demo/ (the pair).
"""

from absl import app
from absl import logging
from ml_collections import config_flags

from gemma_mtp import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce_gpu.py")


def main(argv):
  del argv
  c = _CONFIG.value.to_dict()
  c["target"] = dict(c["target"], layer_types=tuple(c["target"]["layer_types"]))
  c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
  record = pipeline.run(pipeline.PipelineConfig(**c))
  logging.info("done in %.0f s", record["times"]["total_s"])


if __name__ == "__main__":
  app.run(main)
