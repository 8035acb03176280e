"""Drafter distillation: train a drafter against a frozen target, exactly as it runs at inference.

For every position t of a sequence in parallel, the drafter is unrolled for K steps as in one
speculative round whose carried hidden state is the target's at t:

  step 0: input token x[t+1], hidden H_target[t]            -> predicts x[t+2]
  step j: input token x[t+1+j], hidden = drafter output of step j-1 -> predicts x[t+2+j]

with the same tap K/V visibility as inference (the round's taps never change between its steps:
positions <= t, sliding window per `DrafterConfig.convention`; the 'hf' convention is trained in its
all-drafts-accepted form, since its stale entries after a rejection cannot be teacher-forced) and
the same constant query position. Step j is trained against the target's distribution at position
t+1+j (KL(p_target || q_drafter), or cross-entropy to the target's argmax token), with per-step
weights. Inputs of later steps are the data tokens (teacher forcing): at inference they are the
accepted drafts, i.e. tokens the target itself would emit.

The other drafter kinds (`drafter_kinds`) are trained on the same per-step losses, each with its
round at anchor t as inference runs it:
  parallel_heads: head j on (H_target[t], x[t+1]) predicts x[t+2+j] (no recurrence);
  self: step j is the N-layer model at position t+1+j, so one causal pass of the first N target
    layers gives every step; only the adapter is trained (the target's layers are frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_mtp import drafter as drafter_lib
from gemma_mtp import drafter_kinds
from gemma_mtp import heads_drafter
from gemma_mtp import model as model_lib
from gemma_mtp import self_drafter
from gemma_mtp.config import ModelConfig
from gemma_mtp.drafter import DrafterConfig

F32 = jnp.float32


def shift_left(x: jax.Array, n: int, fill=0) -> jax.Array:
  """x[:, t + n] at t (fill past the end). x: [B, T, ...]."""
  if n == 0:
    return x
  pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, n:], pad], axis=1)


def training_masks(taps: dict, *, dcfg: DrafterConfig, window: int, start: jax.Array,
                   length: int) -> tuple[dict, jax.Array]:
  """Tap visibility [B, T, S] and query positions [B, T] for rounds anchored at every position t.

  The round anchored at t has its first input token at index t + 1 and the target's hidden state
  at t; the previous target call ended at t (every earlier draft accepted).
  """
  t = jnp.arange(length, dtype=jnp.int32)
  b = start.shape[0]

  def at(ti):
    last = jnp.full((b,), ti + 1, jnp.int32)
    return drafter_lib.tap_masks(taps, convention=dcfg.convention, window=window, start=start,
                                 last_idx=last, call_start=start, call_end=last - 1)

  masks, query = jax.vmap(at, out_axes=1)(t)
  return masks, query


def _assistant_unroll(dparams, dcfg: DrafterConfig, *, tparams, tcfg: ModelConfig,
                      tokens: jax.Array, out: model_lib.ForwardOutput, steps: int):
  """Step j's logits [B, T, V] at every anchor t: the recurrent unroll with teacher forcing."""
  masks, query = training_masks(out.taps, dcfg=dcfg, window=tcfg.sliding_window,
                                start=jnp.zeros((tokens.shape[0],), jnp.int32),
                                length=tokens.shape[1])
  hidden = out.hidden
  for j in range(steps):
    logits, hidden = drafter_lib.step_seq(
        dparams, dcfg, target_params=tparams, target_config=tcfg, tokens=shift_left(tokens, 1 + j),
        hidden=hidden, query_pos=query, taps=out.taps, masks=masks)
    yield logits


def _heads_unroll(dparams, dcfg, *, tparams, tcfg: ModelConfig, tokens: jax.Array,
                  out: model_lib.ForwardOutput, steps: int):
  """Head j's logits [B, T, V] at every anchor t (one head at a time, to bound memory)."""
  for j in range(steps):
    yield heads_drafter.logits_seq(dparams, dcfg, target_params=tparams, target_config=tcfg,
                                   tokens=shift_left(tokens, 1), hidden=out.hidden,
                                   heads=slice(j, j + 1))[:, :, 0]


def _self_unroll(dparams, dcfg, *, tparams, tcfg: ModelConfig, tokens: jax.Array,
                 out: model_lib.ForwardOutput, steps: int):
  """Step j of the round anchored at t is the N-layer model at position t + 1 + j (its inputs are
  the data tokens under teacher forcing), so one causal pass serves every step."""
  del out
  logits, _ = self_drafter.logits_seq(dparams, dcfg, target_params=tparams, target_config=tcfg,
                                      tokens=tokens)
  for j in range(steps):
    yield shift_left(logits, 1 + j)


_UNROLL = {drafter_kinds.ASSISTANT: _assistant_unroll,
           drafter_kinds.PARALLEL_HEADS: _heads_unroll,
           drafter_kinds.SELF: _self_unroll}


def drafter_loss(dparams, *, dcfg, tparams, tcfg: ModelConfig, tokens: jax.Array,
                 mask: jax.Array | None = None, steps: int, step_weights: tuple[float, ...],
                 loss_type: str = "kl"):
  """Distillation loss of a K-step drafter round at every position (see the module docstring).

  Args:
    dparams: drafter parameters (the only ones differentiated).
    dcfg: a drafter config of any kind (`drafter_kinds`).
    tparams: frozen target parameters.
    tokens: [B, T] int32 training sequences (no padding).
    mask: optional [B, T] bool, positions that may anchor a round (default all).
    steps: K, draft steps per round (at most the drafter's longest draft).
    step_weights: K weights of the per-step losses.
    loss_type: 'kl' (KL(target || drafter), soft targets) or 'ce' (cross-entropy to the target's
      argmax tokens).
  Returns:
    (loss, metrics) with metrics "loss_step_{j}", "agree_step_{j}" (top-1 agreement of drafter
    and target at step j, the teacher-forced acceptance proxy) and "agree_all" (all K agree).
  """
  if len(step_weights) != steps:
    raise ValueError(f"step_weights has {len(step_weights)} entries for {steps} steps")
  if loss_type not in ("kl", "ce"):
    raise ValueError(f"loss_type must be 'kl' or 'ce', got {loss_type!r}")
  if dcfg.kind == drafter_kinds.ASSISTANT and dcfg.num_centroids:
    raise ValueError("drafter_loss trains dense-head drafters; the centroid head's sparse logits "
                     "have no gradient outside the selected clusters (use num_centroids=0)")
  longest = drafter_kinds.max_draft(dcfg)
  if longest is not None and steps > longest:
    raise ValueError(f"steps={steps} exceeds the {longest} drafts the {dcfg.kind} drafter makes")
  b, t = tokens.shape
  out = model_lib.forward(tparams, tokens, config=tcfg)
  out = jax.tree_util.tree_map(jax.lax.stop_gradient, out)
  target_logp = jax.nn.log_softmax(out.logits.astype(F32), axis=-1)     # predicts token t + 1
  target_top = jnp.argmax(target_logp, axis=-1)
  anchor = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  metrics = {}
  total, all_agree = 0.0, anchor
  unroll = _UNROLL[dcfg.kind](dparams, dcfg, tparams=tparams, tcfg=tcfg, tokens=tokens, out=out,
                              steps=steps)
  for j, logits in enumerate(unroll):
    logq = jax.nn.log_softmax(logits, axis=-1)
    p_logp = shift_left(target_logp, 1 + j)                               # target at t + 1 + j
    valid = anchor & (jnp.arange(t)[None, :] + 2 + j < t + 1)              # t+1+j is a position
    if loss_type == "kl":
      per = jnp.sum(jnp.exp(p_logp) * (p_logp - logq), axis=-1)
    else:
      tgt = shift_left(target_top, 1 + j)
      per = -jnp.take_along_axis(logq, tgt[..., None], axis=-1)[..., 0]
    n = jnp.maximum(jnp.sum(valid), 1)
    step_loss = jnp.sum(jnp.where(valid, per, 0.0)) / n
    agree = (jnp.argmax(logq, -1) == shift_left(target_top, 1 + j)) & valid
    all_agree = all_agree & (agree | ~valid)
    metrics[f"loss_step_{j}"] = step_loss
    metrics[f"agree_step_{j}"] = jnp.sum(agree) / n
    total = total + step_weights[j] * step_loss
  metrics["agree_all"] = jnp.mean(all_agree.astype(F32))
  return total / sum(step_weights), metrics
