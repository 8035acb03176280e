"""gemma_mtp: Gemma 4 and its MTP drafters in JAX, with a jitted speculative-decoding loop."""

from gemma_mtp.api import (Drafter, GenerateOutput, Target, fuse_target, generate, load_drafter,
                           load_target, quantize_target, random_drafter, random_target, score)
from gemma_mtp.config import ModelConfig, preset
from gemma_mtp.tree import TreeSpec

__all__ = ["Drafter", "GenerateOutput", "ModelConfig", "Target", "TreeSpec", "fuse_target",
           "generate",
           "load_drafter", "load_target", "preset", "quantize_target", "random_drafter",
           "random_target", "score"]
from gemma_mtp.tokenizer import Tokenizer  # noqa: E402,F401  (training: gemma_mtp.data, .train)
