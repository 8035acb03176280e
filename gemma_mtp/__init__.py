"""gemma_mtp: Gemma 4 and its MTP drafters in JAX, with a jitted speculative-decoding loop."""

from gemma_mtp.api import GenerateOutput, Target, generate, load_target, random_target, score
from gemma_mtp.config import ModelConfig, preset

__all__ = ["GenerateOutput", "ModelConfig", "Target", "generate", "load_target", "preset",
           "random_target", "score"]
