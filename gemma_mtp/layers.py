"""Pure ops of Gemma 4: RMSNorm, RoPE (default and proportional), attention, GeGLU MLP, MoE.

Shape letters: B batch, T query positions, S key positions, D model width, N query heads,
K key/value heads, G = N / K query heads per KV head, H head dim, I MLP width, E experts,
X expert width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import matvec
from gemma_mtp import quant

F32 = jnp.float32


def rms_norm(x: jax.Array, weight: jax.Array | None = None, *, eps: float) -> jax.Array:
  """x / rms(x) * weight, computed in float32 and cast back (weight used as is, not 1 + w)."""
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(F32)
  return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """tanh-approximated GELU (`gelu_pytorch_tanh`)."""
  return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(head_dim: int, theta: float, rotary_fraction: float = 1.0) -> np.ndarray:
  """Inverse frequencies [H/2] of (proportional) RoPE.

  With `rotary_fraction < 1` only the first `int(fraction * H // 2)` pairs rotate, at the frequencies
  of a full H-dim RoPE (the exponent's denominator stays H); the other pairs get frequency 0 and so
  pass through unchanged. fraction = 1 is the default RoPE.
  """
  angles = int(rotary_fraction * head_dim // 2)
  inv = 1.0 / (theta ** (np.arange(0, 2 * angles, 2, dtype=np.float32) / head_dim))
  return np.concatenate([inv, np.zeros(head_dim // 2 - angles, np.float32)]).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE: dim d pairs with d + H/2.

  Args:
    x: [B, T, N, H].
    positions: [B, T] integer positions.
    inv_freq: [H/2].
  """
  freqs = positions[..., None].astype(F32) * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]      # [B, T, 1, H]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(q_idx: jax.Array, kv_idx: jax.Array, start: jax.Array, *,
                   window: int | None) -> jax.Array:
  """Causal (optionally sliding) mask over sequence indices.

  Args:
    q_idx: [B, T] index of each query in the (left-padded) sequence.
    kv_idx: [B, S] index held by each key slot (-1 for an empty slot).
    start: [B] index of each row's first real token; keys before it are padding.
    window: W for sliding layers: a query at q sees keys in (q - W, q].
  Returns:
    [B, T, S] bool, True where attention is allowed.
  """
  q = q_idx[:, :, None]
  k = kv_idx[:, None, :]
  mask = (k <= q) & (k >= start[:, None, None])
  if window is not None:
    mask &= k > q - window
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Scaled-by-1 dot-product attention with GQA (QK-norm replaces 1/sqrt(H)).

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool.
  Returns:
    [B, T, N, H] in q's dtype. Scores and softmax are float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=F32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return out.reshape(b, t, n, h)


def mlp(x: jax.Array, p: dict, *, padded_rows: bool = False) -> jax.Array:
  """GeGLU: down(gelu(x @ gate) * (x @ up)). x: [..., D]; weights float or quant.QArray, gate and
  up separate or joined as `gate_up` [D, 2I] (model.fuse_projections). `padded_rows`: the down
  projection's padded rows too, as `quant.einsum`'s."""
  if "gate_up" in p:
    gate, up = jnp.split(quant.einsum("...D,DI->...I", x, p["gate_up"]), 2, axis=-1)
  else:
    gate = quant.einsum("...D,DI->...I", x, p["gate"])
    up = quant.einsum("...D,DI->...I", x, p["up"])
  return quant.einsum("...I,ID->...D", gelu(gate) * up, p["down"], padded_rows=padded_rows)


def route(x: jax.Array, p: dict, *, top_k: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """Router of the MoE block: exact top-k over float32 softmax probabilities.

  Args:
    x: [M, D] residual stream (before any FFN norm).
  Returns:
    (weights [M, k] float32: renormalised top-k probabilities x per-expert scale,
     experts [M, k] int32).
  """
  d = x.shape[-1]
  r = rms_norm(x, eps=eps) * p["router_scale"].astype(x.dtype) * jnp.asarray(d**-0.5, x.dtype)
  logits = jnp.einsum("MD,DE->ME", r, p["router"])
  probs = jax.nn.softmax(logits.astype(F32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights * p["expert_scale"].astype(F32)[experts]
  return weights, experts


def expert_outputs(x: jax.Array, experts: jax.Array, p: dict) -> jax.Array:
  """Each token's k chosen experts on its row, read per (token, expert) pair.

  Args:
    x: [M, D] the experts' input; experts: [M, k] int32.
  Returns:
    [M, k, D] each pair's down projection (unweighted).
  """
  x_dim = p["down"].shape[1]
  gate_up = quant.expert_matmul(x, p["gate_up"], experts)                   # [M, k, 2X]
  h = gelu(gate_up[..., :x_dim]) * gate_up[..., x_dim:]
  return quant.expert_matmul(h, p["down"], experts)                         # [M, k, D]


def _expert_ffn_gathered(x, weights, experts, p):
  """Few tokens: each token's k chosen experts, read per (token, expert) pair."""
  out = expert_outputs(x, experts, p)
  return jnp.einsum("MkD,Mk->MD", out.astype(F32), weights).astype(x.dtype)


def _expert_ffn_grouped(x, weights, experts, p):
  """Many tokens: sort (token, expert) pairs by expert and run grouped matmuls (ragged_dot)."""
  m, k = experts.shape
  num_experts, x_dim = p["down"].shape[0], p["down"].shape[1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat)
  token_of = order // k
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = x[token_of]                                                   # [M*k, D]
  row_experts = flat[order]
  gate_up = quant.ragged_dot(xs, p["gate_up"], group_sizes, row_groups=row_experts)  # [M*k, 2X]
  h = gelu(gate_up[:, :x_dim]) * gate_up[:, x_dim:]
  out = quant.ragged_dot(h, p["down"], group_sizes, row_groups=row_experts)        # [M*k, D]
  out = out.astype(F32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((m, x.shape[-1]), F32).at[token_of].add(out).astype(x.dtype)


def gathers_experts(tokens: int, top_k: int, num_experts: int) -> bool:
  """The static choice of `moe`: each (token, expert) pair's expert read on its own, or grouped
  matmuls (`ragged_dot`, each distinct expert read once but with more fixed cost).

  With the Pallas kernel (`matvec.enabled()`: GPUs) a pair reads its expert in place, and on an
  H200 (26B-A4B, 128 experts, k = 8) that wins up to a pair per expert: batch-1 decode 4.03 ms
  vs 5.43 grouped, a 5-position verification 5.60 vs 15.5, batch 8 7.25 vs 16.1
  (experiments/results/kernel_probe_h200.json). Without it the pairs' experts are gathered into
  a copy first, which wins only up to a quarter of the experts (batch 1: 5.5 vs 14.2 ms; batch 8:
  17.7 vs 16.5; results/decode_probe_h200.json).
  """
  return tokens * top_k <= (num_experts if matvec.enabled() else num_experts // 4)


def moe(residual: jax.Array, p: dict, *, top_k: int, eps: float, router=None) -> jax.Array:
  """Routed experts of the Gemma 4 MoE block (the shared dense MLP is applied by the caller).

  Args:
    residual: [..., D] residual stream after attention; the router reads it raw and the experts
      read it through `pre_norm`.
    router: None, or `router(x [M, D], p) -> (weights, experts, the experts' input)` in place of
      `route` and the pre-norm (`moe_kernels.route`).
  Returns:
    [..., D] post-normed expert mixture.
  """
  shape = residual.shape
  x = residual.reshape(-1, shape[-1])
  if router is None:
    weights, experts = route(x, p, top_k=top_k, eps=eps)
    xn = rms_norm(x, p["pre_norm"], eps=eps)
  else:
    weights, experts, xn = router(x, p)
  if gathers_experts(x.shape[0], top_k, p["down"].shape[0]):
    out = _expert_ffn_gathered(xn, weights, experts, p)
  else:
    out = _expert_ffn_grouped(xn, weights, experts, p)
  return rms_norm(out, p["post_norm"], eps=eps).reshape(shape)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)
