"""Parallel multi-head drafter (Medusa / DeepSeek-MTP style): all K drafts from one call.

Head j (j = 0..H-1) predicts the token j + 1 positions after the round's last token x (at index L),
from the target's final-normed hidden state h at L - 1 (`SpecState.hidden`) and x's embedding:

  e = E_target[x] * sqrt(D)                                 the target's embedding, as the assistant
  z_j = [e, h] @ in_proj_j                                  [B, 2D] -> [B, D]
  z_j = z_j + GeGLU_j(RMSNorm(z_j))                         one residual MLP block per head
  logits_j = softcap(RMSNorm(z_j, final_norm_j) @ E_target^T)   the target's tied head, frozen

The head is the target's own tied LM head (shared, not trained): the heads only learn to move the
state to where the target's head reads the token j + 1 ahead; an own [V, D] table per head would
cost V * D parameters each (400M per head at E2B size). `down` starts at zero, so an untrained head
is a linear map into the target's head (Medusa's initialisation).

Drafts of one round are independent given (h, x): head j does not see drafts 1..j. Stochastic
drafting samples each d_j from its own q_j, which is a valid proposal for the exact
accept/resample rule (q_j may be any distribution fixed before d_j is drawn). A bucket K uses the
first K heads, so the longest bucket is at most H.

Parameter tree (H heads, D target width, I MLP width):
  in_proj [H, 2D, D], pre_norm [H, D], mlp: {gate [H, D, I], up [H, D, I], down [H, I, D]},
  final_norm [H, D]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from gemma_mtp import layers
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import sampling
from gemma_mtp.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParallelHeadsConfig:
  """A parallel-heads drafter for one target.

  Attributes:
    target_embed_dim: D, the target's width (the heads work at that width).
    vocab_size: V (the target's).
    num_heads: H prediction heads = the longest draft it makes.
    mlp_dim: I, GeGLU width of each head's residual block.
    rms_eps, dtype, param_dtype: as the target.
  """

  kind: ClassVar[str] = "parallel_heads"  # see drafter_kinds.py

  target_embed_dim: int
  vocab_size: int
  num_heads: int
  mlp_dim: int
  rms_eps: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.num_heads < 1 or self.mlp_dim < 1:
      raise ValueError(f"num_heads={self.num_heads} and mlp_dim={self.mlp_dim} must be >= 1")

  @property
  def max_draft(self) -> int:
    return self.num_heads

  def replace(self, **kw) -> "ParallelHeadsConfig":
    return dataclasses.replace(self, **kw)


def for_target(target: ModelConfig, *, num_heads: int, mlp_dim: int) -> ParallelHeadsConfig:
  return ParallelHeadsConfig(target_embed_dim=target.embed_dim, vocab_size=target.vocab_size,
                             num_heads=num_heads, mlp_dim=mlp_dim, rms_eps=target.rms_eps,
                             dtype=target.dtype, param_dtype=target.param_dtype)


def check_matches(cfg: ParallelHeadsConfig, target: ModelConfig) -> list[str]:
  """Problems that keep `cfg` from running with `target` (empty if none)."""
  problems = []
  if cfg.target_embed_dim != target.embed_dim:
    problems.append(f"heads width {cfg.target_embed_dim} != target embed_dim {target.embed_dim}")
  if cfg.vocab_size != target.vocab_size:
    problems.append(f"heads vocab_size {cfg.vocab_size} != target vocab_size {target.vocab_size}")
  return problems


def param_specs(cfg: ParallelHeadsConfig) -> dict[str, Any]:
  h, d, i = cfg.num_heads, cfg.target_embed_dim, cfg.mlp_dim
  spec = params_lib.ParamSpec
  return {
      "in_proj": spec((h, 2 * d, d), (None, "embed2", "embed"), fan_in_axes=(1,)),
      "pre_norm": spec((h, d), (None, "embed"), init="ones"),
      "mlp": {
          "gate": spec((h, d, i), (None, "embed", "mlp"), fan_in_axes=(1,)),
          "up": spec((h, d, i), (None, "embed", "mlp"), fan_in_axes=(1,)),
          "down": spec((h, i, d), (None, "mlp", "embed"), init="zeros"),
      },
      "final_norm": spec((h, d), (None, "embed"), init="ones"),
  }


def init_params(cfg: ParallelHeadsConfig, key: jax.Array):
  return params_lib.init_from_specs(param_specs(cfg), cfg, key)


def logits_seq(params: dict, cfg: ParallelHeadsConfig, *, target_params: dict,
               target_config: ModelConfig, tokens: jax.Array, hidden: jax.Array,
               heads: slice = slice(None)) -> jax.Array:
  """Logits of the selected heads for T independent anchors per row.

  Args:
    tokens: [B, T] int32, the token after each anchor (the round's last token x).
    hidden: [B, T, D] target final-normed hidden state at each anchor.
    heads: which heads run (a bucket K runs slice(0, K)).
  Returns:
    float32 logits [B, T, Hs, V]: head j's distribution over the token j + 1 after x.
  """
  dtype = jnp.dtype(cfg.dtype)
  p = jax.tree_util.tree_map(lambda w: w[heads].astype(dtype), params)
  e = model_lib.embed_tokens(target_params, tokens, target_config).astype(dtype)
  u = jnp.concatenate([e, hidden.astype(dtype)], axis=-1)              # [B, T, 2D]
  z = quant.einsum("BTE,HED->BTHD", u, p["in_proj"])
  zn = layers.rms_norm(z, p["pre_norm"], eps=cfg.rms_eps)
  gate = quant.einsum("BTHD,HDI->BTHI", zn, p["mlp"]["gate"])
  up = quant.einsum("BTHD,HDI->BTHI", zn, p["mlp"]["up"])
  z = z + quant.einsum("BTHI,HID->BTHD", layers.gelu(gate) * up, p["mlp"]["down"])
  z = layers.rms_norm(z, p["final_norm"], eps=cfg.rms_eps)             # [B, T, Hs, D]
  b, t, hs, d = z.shape
  logits = model_lib.lm_head(target_params, z.reshape(b, t * hs, d), target_config)
  return logits.reshape(b, t, hs, -1)


def draft(dparams, dcfg: ParallelHeadsConfig, tparams, tcfg: ModelConfig, state, *, k: int,
          sampler: sampling.SamplingParams, key: jax.Array):
  """The first k heads on (state.hidden, state.last), one call.

  Returns:
    (drafts [B, k] int32, q [B, k, V] or None (greedy), state.cache unchanged).
  """
  logits = logits_seq(dparams, dcfg, target_params=tparams, target_config=tcfg,
                      tokens=state.last[:, None], hidden=state.hidden[:, None],
                      heads=slice(0, k))[:, 0]                           # [B, k, V]
  drafts, q = sampling.draw(key, logits, sampler)
  return drafts, q, state.cache
