"""Pruned self-drafter: the target's own first N layers, its final norm and tied head.

  x = first N target layers (the target's weights, not copies)   [B, T, D]
  x = x + (x @ A) @ B                   optional low-rank adapter (B starts at zero), trained alone
  logits = softcap(RMSNorm(x, final_norm) @ E^T)                 the target's norm and head

Drafting is autoregressive: K single-token steps of the N-layer model, each sampled (or argmaxed)
from its own processed distribution.

The KV cache is the target's. For committed positions, layer i < N's K/V are exactly what the
N-layer model computes (same weights, tokens and positions; the adapter sits after the last layer),
so a separate drafter cache would duplicate them and need catching up with the tokens it has not
seen (the bonus token, the last accepted draft). Instead the draft steps write their K/V at
L..L+K-1 into the target's buffers of layers < N (and the shared sliding-ring index), and the
verify forward that follows writes every layer at L..L+K over them: after the round, the cache is
what it would have been without the drafter, and rejected positions are hidden by the length
commit as usual. The ring holds window + K + 1 slots, so these writes never evict a key a kept
position needs. KV-shared layers are handled as in the target: with N past the first shared
layer, the prefix config shares the same layers (their sources lie in the prefix).

int8 layers: `with_int8_layers` gives a self-drafter that runs int8 copies of the N layers (taken
from the int8-quantized target, `quant.quantize_params`) while the target it drafts for keeps its
float weights, so a draft step reads half the layer bytes. The copies are the drafter's own
parameters (`layers`); the embedding / head, PLE table and final norm stay the target's. Its draft
steps attend to the committed K/V of the float target (already in the cache) and to their own int8
K/V of the draft positions, which the verify forward overwrites as above: drafts differ from the
float prefix's only by the int8 rounding, and verification stays exact whatever they are.

Parameter tree: adapter: {a [D, r], b [r, D]} (with adapter_rank > 0), layers: [N layer trees with
`quant.QArray` matmul weights] (with int8 layers); {} for neither.
"""

from __future__ import annotations

import dataclasses
import functools
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
class SelfDrafterConfig:
  """A self-drafter for one target.

  Attributes:
    target_embed_dim: D, the target's width.
    vocab_size: V (the target's).
    num_layers: N, the target layers it runs (1..the target's layer count).
    adapter_rank: r of the residual adapter before the final norm; 0 for none.
    dtype: the target's compute dtype (layers and adapter run in the target's dtype).
    param_dtype: the adapter's stored dtype.
    int8_layers: None: the drafter runs the target's own first N layers. Else the N-layer prefix
      config of its target (`prefix_config`): the drafter carries int8 copies of those layers
      (`with_int8_layers`) and runs them instead.
  """

  kind: ClassVar[str] = "self"  # see drafter_kinds.py

  target_embed_dim: int
  vocab_size: int
  num_layers: int
  adapter_rank: int = 0
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  int8_layers: ModelConfig | None = None

  def __post_init__(self):
    if self.num_layers < 1 or self.adapter_rank < 0:
      raise ValueError(f"num_layers={self.num_layers} must be >= 1 and adapter_rank="
                       f"{self.adapter_rank} >= 0")
    if self.int8_layers is not None and self.int8_layers.num_layers != self.num_layers:
      raise ValueError(f"int8_layers has {self.int8_layers.num_layers} layers, expected "
                       f"num_layers={self.num_layers}")

  def replace(self, **kw) -> "SelfDrafterConfig":
    return dataclasses.replace(self, **kw)


def for_target(target: ModelConfig, *, num_layers: int, adapter_rank: int = 0
               ) -> SelfDrafterConfig:
  return SelfDrafterConfig(target_embed_dim=target.embed_dim, vocab_size=target.vocab_size,
                           num_layers=num_layers, adapter_rank=adapter_rank, dtype=target.dtype,
                           param_dtype=target.param_dtype)


def check_matches(cfg: SelfDrafterConfig, target: ModelConfig) -> list[str]:
  """Problems that keep `cfg` from running with `target` (empty if none)."""
  problems = []
  if cfg.target_embed_dim != target.embed_dim:
    problems.append(f"self-drafter width {cfg.target_embed_dim} != target embed_dim "
                    f"{target.embed_dim}")
  if cfg.vocab_size != target.vocab_size:
    problems.append(f"self-drafter vocab_size {cfg.vocab_size} != target vocab_size "
                    f"{target.vocab_size}")
  if cfg.num_layers > target.num_layers:
    problems.append(f"self-drafter num_layers {cfg.num_layers} > the target's "
                    f"{target.num_layers} layers")
  elif cfg.int8_layers is not None:
    shapes = lambda c: params_lib.map_specs(lambda s: s.shape, params_lib.param_specs(c)["layers"])
    if shapes(cfg.int8_layers) != shapes(prefix_config(target, cfg.num_layers)):
      problems.append("the self-drafter's int8 layers are not shaped as the target's first "
                      f"{cfg.num_layers} layers")
  return problems


@functools.cache
def prefix_config(target: ModelConfig, num_layers: int) -> ModelConfig:
  """The target's first `num_layers` layers as a decoder (KV sharing kept where it falls)."""
  shared = max(0, num_layers - target.first_shared_layer)
  return target.replace(layer_types=target.layer_types[:num_layers],
                        num_kv_shared_layers=shared)


def param_specs(cfg: SelfDrafterConfig) -> dict[str, Any]:
  specs = {}
  if cfg.adapter_rank:
    d, r = cfg.target_embed_dim, cfg.adapter_rank
    specs["adapter"] = {
        "a": params_lib.ParamSpec((d, r), ("embed", None)),
        "b": params_lib.ParamSpec((r, d), (None, "embed"), init="zeros"),
    }
  if cfg.int8_layers is not None:
    specs["layers"] = quant.quantized_specs(cfg.int8_layers)["layers"]
  return specs


def init_params(cfg: SelfDrafterConfig, key: jax.Array):
  if cfg.int8_layers is not None:
    raise ValueError("a self-drafter's int8 layers are copies of its target's: build it with "
                     "with_int8_layers")
  return params_lib.init_from_specs(param_specs(cfg), cfg, key)


def with_int8_layers(cfg: SelfDrafterConfig, params: dict, quantized_target_params: dict,
                     target: ModelConfig) -> tuple[SelfDrafterConfig, dict]:
  """The self-drafter (`cfg`, `params`: its adapter, if any) on int8 copies of its N layers.

  Args:
    quantized_target_params: the target's parameters quantized by `quant.quantize_params` (e.g.
      `api.quantize_target(target).params`); only its first N layers are kept.
    target: the target's config (the drafter still drafts for the float target).
  Returns:
    (config with `int8_layers`, params with `layers`: the N int8 layer trees).
  """
  layers_ = quantized_target_params["layers"][:cfg.num_layers]
  if not any(quant.is_quantized(w) for w in
             jax.tree_util.tree_leaves(layers_, is_leaf=quant.is_quantized)):
    raise ValueError("with_int8_layers needs quantized target params (quant.quantize_params)")
  qcfg = cfg.replace(int8_layers=prefix_config(target, cfg.num_layers))
  problems = check_matches(qcfg, target)
  if problems:
    raise ValueError("; ".join(problems))
  return qcfg, {**{k: v for k, v in params.items() if k != "layers"}, "layers": list(layers_)}


def logits_seq(params: dict, cfg: SelfDrafterConfig, *, target_params: dict,
               target_config: ModelConfig, tokens: jax.Array, cache=None):
  """The N-layer model on `tokens` [B, T] (causal without a cache, else after `cache.length`).

  Returns:
    (float32 logits [B, T, V] (position t predicts t + 1), cache with the first N layers' K/V of
    the chunk written, or None).
  """
  pcfg = prefix_config(target_config, cfg.num_layers)
  if cfg.int8_layers is not None:   # the drafter's own int8 copies of the layers
    target_params = {**target_params, "layers": params["layers"]}
  x, _, cache = model_lib.run_layers(target_params, tokens, config=pcfg, cache=cache)
  if cfg.adapter_rank:
    a = params["adapter"]
    x = x + jnp.einsum("BTR,RD->BTD", jnp.einsum("BTD,DR->BTR", x, a["a"].astype(x.dtype)),
                       a["b"].astype(x.dtype))
  hidden = layers.rms_norm(x, target_params["final_norm"].astype(x.dtype),
                           eps=target_config.rms_eps)
  return model_lib.lm_head(target_params, hidden, target_config), cache


def draft(dparams, dcfg: SelfDrafterConfig, tparams, tcfg: ModelConfig, state, *, k: int,
          sampler: sampling.SamplingParams, key: jax.Array):
  """k single-token steps from state.last through the target's cache (see the module docstring).

  Returns:
    (drafts [B, k] int32, q [B, k, V] or None (greedy), the cache with the draft K/V of layers
    < N written at length..length+k-1; its length is unchanged).
  """
  n, full = dcfg.num_layers, state.cache
  own = full.replace(k=full.k[:n], v=full.v[:n])   # only these buffers change

  def one(carry, step_key):
    tok, cache = carry
    logits, cache = logits_seq(dparams, dcfg, target_params=tparams, target_config=tcfg,
                               tokens=tok[:, None], cache=cache)
    nxt, q = sampling.draw(step_key, logits[:, 0], sampler)
    return (nxt, cache.replace(length=cache.length + 1)), (nxt, q)

  (_, own), (drafts, q) = jax.lax.scan(one, (state.last, own), jax.random.split(key, k))
  cache = full.replace(k=own.k + full.k[n:], v=own.v + full.v[n:], ring_idx=own.ring_idx)
  return drafts.T, (None if q is None else jnp.swapaxes(q, 0, 1)), cache
