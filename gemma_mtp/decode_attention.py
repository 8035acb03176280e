"""The target's attention at one position per row as two Pallas (Triton) kernels, on GPUs.

A decode step of the small targets is bound by its kernel count, not by its bytes (E4B: ~1,200
kernels, 4.0 ms where its weights allow ~2.3; NOTES runs O, P, U). XLA runs a layer's attention
as ~11 short kernels: the q|k|v norms, RoPE, slices, the two cache writes, the score GEMM, two
softmax reductions, a convert, the value GEMM and the pad of the o projection's input to two rows
(`quant.pad_one_row`). Here that is two kernels:

  attn:  one query head (q-normed and rotated in the kernel) over a range of the cache's slots,
         the normalised partial output and its log-sum-exp; range 0 also takes the step's own
         token, its key k-normed and rotated and its value v-normed in the kernel, and stores
         them into the token's cache slot, in place (`drafter_kernels._attn_kernel`, shared
         with the drafter step)                                              grid (B, N, P)
  rows:  a head's ranges combined into its output, in the model's dtype, with the zero rows of
         the o projection's two-row input where `quant` pads (so no pad kernel)
                                                                             grid (R, N, H / bc)

The token's slot is masked out of the cache pass (the token joins from its projection), so
programs may read it before or after it is stored. The attention kernel reads row b of the
q|k|v projection's padded two-row output itself (no slice kernel). KV-shared layers run the same
kernel without the new token.

Measured on an H100 (NOTES runs BA-BF; step time against the same step with the switch off, in
the same process): batch 1, 1k context: E4B 4.86 -> 4.56 ms (1,198 -> 914 kernels a step),
E2B 2.96 -> 2.76, 26B-A4B 4.63 -> 4.35, 31B 22.15 -> 21.91; 8k context: E4B -9.0%, E2B -1.6%,
26B-A4B -4.9%, 31B a tie; batch 8: slower (E2B +4.3%), hence AUTO_MAX_BATCH.

Where it runs: `choose` (the switch `enabled()`: GPU and one device, or
GEMMA_MTP_ATTENTION_KERNELS=on; off switches it off; one position per row, a cache, no tree,
head dims whose half is a power of two >= 16, and under the automatic switch at most
AUTO_MAX_BATCH rows), in the layers of the fused projection layout and the KV-shared layers.
Off the GPU the kernels run in Pallas's interpreter, which is how the tests compare them with
XLA's attention.
Values: as `drafter_kernels` (float32 inside, rounded to the dtype where the model rounds; the
softmax is normalised after the value product, where `layers.attention` rounds the probabilities
first), so float32 agrees with XLA up to summation order and bfloat16 is as close to float32
arithmetic as XLA's path is, not bit-equal.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from gemma_mtp import drafter_kernels as dk
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import quant
from gemma_mtp.config import ModelConfig

F32 = jnp.float32
ENV = "GEMMA_MTP_ATTENTION_KERNELS"
# The automatic switch takes batches up to this. Measured on an H100 (NOTES runs BC, BD; step
# time with against without): E4B -6.3% / -6.1% / -4.3% at batch 1 / 2 / 4 and +0.8% at batch 8,
# E2B -7.0% / -6.6% / -4.6% and +4.3% (a head's 4-8 programs read the same keys and values, which
# XLA's batched GEMMs read once).
AUTO_MAX_BATCH = 4
# Cache chunks a program reads (about; `drafter_kernels._chunking`): fewer make more, shorter
# programs (E4B's 512-slot sliding layers: 8 heads x 8 ranges of 2 chunks of 32 slots). A knob
# for the step probe's variants (fused_attn_range1 / _range4); 2 is the drafter's, as measured.
RANGE_CHUNKS = 2


def enabled() -> bool:
  """Whether the switch is on in programs traced now (see the module doc)."""
  return matvec.switch(ENV)


def supported(cfg: ModelConfig) -> str | None:
  """None if the kernels take `cfg`'s heads, else why not."""
  bad = sorted({hd for hd in (cfg.head_dim, cfg.global_head_dim)
                if hd // 2 < 16 or hd & (hd - 1)})
  if bad:
    return f"head dims {bad} (half of a head must be a power of two >= 16)"
  return None


def choose(cfg: ModelConfig, rows: int, tokens_per_row: int, has_cache: bool, tree) -> bool:
  """Whether `model.run_layers` runs this forward's attention as these kernels (under the
  automatic switch only at batches up to AUTO_MAX_BATCH; =on at any batch)."""
  if not (enabled() and has_cache and tree is None and tokens_per_row == 1
          and supported(cfg) is None):
    return False
  return matvec.switch_mode(ENV) == "on" or rows <= AUTO_MAX_BATCH


def _combine_rows_kernel(o_ref, lse_ref, x_ref, *, rows, bc, zeros, rnd):
  """Columns [c * bc, (c + 1) * bc) of head n's output for row b from its ranges' partials;
  the padding rows b >= rows zero (`zeros`) or row rows - 1 again."""
  b, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  src = jnp.minimum(b, rows - 1)
  x = dk._combined(lse_ref[src, n], o_ref[src, n, :, dk._columns(c, bc)], rnd)
  if zeros:
    x = jnp.where(b < rows, x, 0.0)
  x_ref[...] = x.astype(x_ref.dtype)


class Step:
  """The per-forward pieces of one decode step's attention (the masks and RoPE tables of each
  layer kind, made once), and `__call__` per layer.

  Args:
    cfg: the model.
    kv_idx: {kind: [B, S] sequence index held by each slot} (the sliding ring's labels already
      updated for this step's token).
    idx: [B, 1] the step's sequence index; start: [B]; positions: [B, 1] RoPE positions.
  """

  def __init__(self, cfg: ModelConfig, kv_idx: dict, idx, start, positions):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    self.rnd = dk._rounder(self.dtype)
    self.valid, self.rope, self.slot = {}, {}, {}
    from gemma_mtp import model as model_lib   # (model imports this module)
    for kind, slots in kv_idx.items():
      window = cfg.sliding_window if kind == "sliding" else None
      mask = layers.attention_mask(idx, slots, start, window=window)[:, 0]      # [B, S]
      # owners mask the token's own slot (the kernel stores into it); shared layers read it
      self.valid[kind] = {True: (mask & (slots != idx)).astype(jnp.int32),
                          False: mask.astype(jnp.int32)}
      self.slot[kind] = idx[:, 0] % slots.shape[1]
      freqs = positions[:, 0, None].astype(F32) * jnp.asarray(model_lib.rope_inv_freq(cfg, kind))
      self.rope[kind] = tuple(self.rnd(f(freqs)) for f in (jnp.cos, jnp.sin))

  def __call__(self, raw, q_norm, k, v, kind: str, *, new_at=None, k_norm=None, o_weight=None):
    """Attention of one layer.

    Args:
      raw: [R, 1, C, H] the raw projection (R >= B rows, the first B real: `quant.einsum`'s
        `padded_rows`): q heads first (N of them), then (with `new_at`) the step's key and value
        heads.
      q_norm, k_norm: the norms' weights [H].
      k, v: [B, S, K, H] the cache before this step's write (owners) or the source layer's
        (KV-shared layers, `new_at` None).
      new_at: (k_at, v_at) the first key and value heads in `raw` (owners); None (shared).
      o_weight: the o projection's weight: the output's rows are padded as `quant.einsum` pads
        a one-row input for it (float weights).
    Returns:
      (out [R, 1, N, H] (R >= B rows: the padded rows as `quant.PAD_ROWS_WITH`), and with
      `new_at` k and v with the token's key and value in its slot (updated in place), else None,
      None).
    """
    cfg, rnd = self.cfg, self.rnd
    b, hd = k.shape[0], raw.shape[-1]
    heads, slots, kv_heads = cfg.num_heads, k.shape[1], k.shape[2]
    bs, chunks, splits = dk._chunking(slots, hd, RANGE_CHUNKS)
    cos, sin = self.rope[kind]
    ins = [raw.reshape(raw.shape[0], -1, hd), q_norm]
    outs = [((b, heads, splits, w), F32, (None, None, None, w), lambda i, j, s: (i, j, s, 0))
            for w in (hd, dk.LSE)]
    if new_at is not None:
      ins.append(k_norm)
    ins += [cos, sin]
    at_k = len(ins)
    ins += [k, v, self.valid[kind][new_at is not None]]
    aliases = None
    if new_at is not None:   # the token's slot; k and v come back with it written, in place
      ins.append(self.slot[kind])
      outs += [(c.shape, c.dtype, c.shape, lambda *_: (0, 0, 0, 0)) for c in (k, v)]
      aliases = {at_k: 2, at_k + 1: 3}
    res = dk._call(functools.partial(dk._attn_kernel, group=heads // kv_heads, bs=bs,
                                     per_split=-(-chunks // splits), slots=slots, hd=hd,
                                     eps=cfg.rms_eps, rnd=rnd, new_at=new_at),
                   (b, heads, splits), ins, outs, "decode_attention", aliases=aliases)
    # the o projection's two-row input, where `quant.einsum` would pad it (float weights: an
    # int8 one may go through `matvec`'s one-row kernel instead)
    rows = b
    if (b == 1 and o_weight is not None and not quant.is_quantized(o_weight)
        and quant.pads_one_row(o_weight)):
      rows = 2
    bc = matvec.pow2_divisor(hd, max(16, dk.TILE // splits))
    (out,) = dk._call(functools.partial(_combine_rows_kernel, rows=b, bc=bc, rnd=rnd,
                                        zeros=quant.PAD_ROWS_WITH == "zeros"),
                      (rows, heads, hd // bc), res[:2],
                      [((rows, heads, hd), self.dtype, (None, None, bc),
                        lambda i, j, c: (i, j, c))], "decode_attention_rows")
    out = out[:, None]
    if new_at is None:
      return out, None, None
    return out, res[2], res[3]
