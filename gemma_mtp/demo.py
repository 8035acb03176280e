"""The demo pair shipped with the package: a small code model, its MTP drafter and tokenizer.

Trained on an NVIDIA H200 by `experiments/reproduce_gpu.py --demo` on the Python standard library
(see the README's "Reproduce" section); stored as bf16 Orbax directories under gemma_mtp/demo/.
"""

from __future__ import annotations

import logging
import pathlib

from gemma_mtp import api

log = logging.getLogger(__name__)

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"
TARGET_DIR = DEMO_DIR / "target"
DRAFTER_DIR = DEMO_DIR / "drafter"
TOKENIZER_FILE = DEMO_DIR / "tokenizer.model"


def load_demo(*, dtype: str = "float32", convention: str | None = None):
  """Returns (target, drafter, tokenizer) of the shipped demo pair.

  Args:
    dtype: compute dtype; float32 is the fast choice on CPUs (bf16 matmuls are emulated there).
    convention: drafter attention convention override ('hf' / 'clean'); default: as trained.
  """
  from gemma_mtp import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  missing = [p for p in (TARGET_DIR, DRAFTER_DIR, TOKENIZER_FILE) if not p.exists()]
  if missing:
    raise FileNotFoundError(f"the demo pair is incomplete: missing {', '.join(map(str, missing))}; "
                            "reinstall the package or rerun experiments/reproduce_gpu.py --demo")
  target = api.load_target(TARGET_DIR, dtype=dtype)
  drafter = api.load_drafter(DRAFTER_DIR, target, convention=convention)
  tok = tokenizer_lib.Tokenizer.load(TOKENIZER_FILE)
  log.info("loaded the demo pair from %s", DEMO_DIR)
  return target, drafter, tok
