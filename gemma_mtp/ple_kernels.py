"""The end of a decode layer of the per-layer-embedding targets (E2B, E4B) as three Pallas
(Triton) kernels, on GPUs.

After its MLP, a layer of a PLE model adds the MLP's normed output to the residual, gates the
per-layer input with the result, projects it back and adds it normed, then scales by the layer
scalar (`model.block`); the next layer starts by norming that. At one position a row XLA runs
this as ~10 short kernels (the down projection's row slice, two norms, the pads of the gate and
projection GEMMs' one-row inputs, the two GEMMs of 1.3 MB each at ~0.4 TB/s, the residual adds,
the next layer's norm and the pad of its q|k|v input; NOTES run BC's step sequence: ~17 us a
layer on an H100). Here it is three kernels, each recomputing the small vectors it needs from
the previous kernel's outputs (as `drafter_kernels` does):

Each position of the forward is a row of the kernels (a decode step's rows, or the K + 1
positions of a chain's verification).

  gate:    x2 = x1 + norm(d) (d: the down projection's output); part s of x2 @ W_gate, S splits
           of the contraction                                              grid (B, P / bn, S)
  proj:    g = gelu(sum of gate's parts) * ple; p = g @ W_proj                grid (B, D / bn)
  finish:  x = (x2 + norm(p)) * layer_scalar, and the next layer's pre-attention norm of x,
           written with the padded rows its q|k|v (or q) projection's one-row input gets
           (`quant.pads_one_row`), so no pad kernel                           grid (R,)

The proj kernel reads its layer's slice of every layer's inputs itself (a slice passed to a
kernel is a copy kernel of its own: run BH's 42 copies a step).

Measured on an H100 (NOTES runs BH-BL; step time against the same step with the switch off, the
attention kernels on in both, in the same process): batch 1, 1k context: E4B 4.541 -> 4.352 ms
(-4.2%; 914 -> 664 kernels a step), E2B 2.774 -> 2.617 (-5.7%); with `decode_attention`'s
kernels, against neither: E4B -10.3%, E2B -12.2%. Batch 4: E4B -1.9%, E2B -3.5%. E4B's
verification forwards of 2 / 3 / 4 positions (run BM): -2.4% / -2.1% / -2.3%. The kernels
take ~3 us each, the ten XLA ones they replace ~17 us a layer; XLA's split-K reduction of the
down projection, fused before into the slice and the norm, stays a kernel of its own (1.4 us).

Where they run: `choose` (the switch `enabled()`: GPU and one device, or
GEMMA_MTP_PLE_KERNELS=on; off switches them off; a forward through a cache without a tree; a
model with per-layer inputs, no MoE, float PLE weights, widths multiples of 16; under the
automatic switch at most AUTO_MAX_BATCH positions in all, or one row of at most
AUTO_MAX_POSITIONS, each of whose programs read the two PLE weights again). Off the GPU the
kernels run in Pallas's interpreter, which is how the tests compare them with XLA's path.
Values: float32 inside, rounded to the model's dtype wherever `model.block` rounds (each norm,
GEMM output, residual add, the GELU and its product), so float32 agrees with XLA up to
summation order and bfloat16 is as close to float32 arithmetic as XLA's path is, not bit-equal.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from gemma_mtp import drafter_kernels as dk
from gemma_mtp import matvec
from gemma_mtp import quant
from gemma_mtp.config import ModelConfig

F32 = jnp.float32
ENV = "GEMMA_MTP_PLE_KERNELS"
# The automatic switch takes batches up to this (every row's programs read the PLE weights
# again; measured to batch 4, NOTES run BL, as `decode_attention`'s limit).
AUTO_MAX_BATCH = 4
# ... and at batch 1 forwards of up to this many positions (a chain's verification of up to 4
# drafts). Measured on an H100 (NOTES run CO; 1k context, =on against the automatic switch at
# 4, same process, two passes): E4B 5 positions -2.4% / -2.1%, 9 positions +2.1% / +1.1%; E2B
# 5 positions -4.2%. At 5 positions the attention end (ATTENTION_END) comes with them; run BP
# measured 5 positions at -0.4% before it and the attention kernels' own range.
AUTO_MAX_POSITIONS = 5
# The gate kernel's contraction parts: `drafter_kernels`' split times this (a power of two).
# Measured on an H100 (NOTES run BJ): 2 took the gate kernel from 4.0 to 3.0 us (E4B, 64 -> 128
# programs), the step 0.9% (E4B) and 1.3% (E2B); the step probe's variant fused_ple_split2
# doubles it again.
GATE_PARTS = 2
# Where a layer ends with a tail kernel (`model.block`'s `tail`: these kernels, or
# `moe_kernels.tail`), the step from the o projection's output to the MLP's input as one kernel
# too (`attention_end`): the post-attention norm, the residual add and the pre-FFW norm,
# written with the padded rows the gate|up projection takes. XLA runs it as 3-4 kernels after
# the o GEMM (the padded rows' slice, two norms and the add, the gate|up input's pad): ~6.5 us
# a layer (E4B on an H100, run CC's profile; 26B-A4B on an H200 ~6.6, run BZ's). Run BJ's
# residual kernel of this kind took 2.6 us (its o projection was a kernel too, and slow; this
# one keeps XLA's o GEMM). Measured on an H100 (NOTES runs CG, CH, CH2; step_probe variant
# `fused_attn_end`, two runs each): a batch-1 decode step E2B -4.8% / -4.4%, E4B -1.2% / -1.9%,
# 26B-A4B -2.8% / -0.7%; 5-position verification E4B -0.2% / -0.1%, E2B +2.7% / -0.7%,
# 26B-A4B -2.9%; 26B-A4B at batch 8 -0.1%.
ATTENTION_END = True


def enabled() -> bool:
  """Whether the switch is on in programs traced now (see the module doc)."""
  return matvec.switch(ENV)


def supported(cfg: ModelConfig, params: dict) -> str | None:
  """None if the kernels take `cfg`'s layers with these parameters, else why not."""
  if not cfg.per_layer_dim:
    return "no per-layer inputs"
  layers = params["layers"][:cfg.num_layers]
  if any("moe" in p for p in layers):
    return "MoE layers"
  if any(quant.is_quantized(p["ple"][k]) for p in layers for k in ("gate", "proj")):
    return "int8 PLE weights"
  bad = [n for n in (cfg.embed_dim, cfg.per_layer_dim) if n < 16 or n % 16]
  if bad:
    return f"widths {bad} (not multiples of 16)"
  return None


def choose(cfg: ModelConfig, params: dict, rows: int, tokens_per_row: int, has_cache: bool,
           tree) -> bool:
  """Whether `model.run_layers` ends its layers with these kernels: a forward through the cache
  without a tree (a decode step, or a chain's verification), each of whose rows x positions is
  a row of the kernels; under the automatic switch only up to AUTO_MAX_BATCH of those, or one
  row of up to AUTO_MAX_POSITIONS; =on at any number."""
  if not (enabled() and has_cache and tree is None and supported(cfg, params) is None):
    return False
  return matvec.switch_mode(ENV) == "on" or auto_takes(rows, tokens_per_row)


def auto_takes(rows: int, tokens_per_row: int) -> bool:
  """The automatic switch's rule for a forward the kernels can run (see `choose`)."""
  return rows * tokens_per_row <= AUTO_MAX_BATCH or (
      rows == 1 and tokens_per_row <= AUTO_MAX_POSITIONS)


def _spans(n: int) -> list:
  """[0, n) in chunks of a power of two (at most dk.CHUNK)."""
  return dk._spans(n, matvec.pow2_divisor(n, dk.CHUNK))


def _x2(x1_ref, d_ref, w_ref, b, spans, n, eps, rnd):
  """x1 + rms_norm(d) * w of row b, in chunks (the residual after the MLP)."""
  x1 = [dk._f32(x1_ref[b, ds]) for ds in spans]
  d = [dk._f32(d_ref[b, ds]) for ds in spans]
  w = [dk._f32(w_ref[ds]) for ds in spans]
  return [rnd(a + c) for a, c in zip(x1, dk._norm(d, w, n, eps, rnd))]


def _gate_kernel(x1_ref, d_ref, post_ref, w_ref, out_ref, *, rows, bn, eps, rnd):
  """Part s of x2 @ W_gate: contraction rows [s * rows, (s + 1) * rows) (x2 = x1 + norm(d) * w,
  the norm's scale from all of d)."""
  b, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n = x1_ref.shape[1]
  bk = dk._rows_per_chunk(rows, bn)
  part = dk._spans(rows, bk, s * rows)
  d = [dk._f32(d_ref[b, ds]) for ds in _spans(n)]
  x1 = [dk._f32(x1_ref[b, ds]) for ds in part]
  d_part = [dk._f32(d_ref[b, ds]) for ds in part]
  post = [dk._f32(post_ref[ds]) for ds in part]
  w = [w_ref[ds, dk._columns(c, bn)] for ds in part]
  scale = dk._inv_rms(d, n, eps)
  x2 = [rnd(a + rnd(dc * scale * pc)) for a, dc, pc in zip(x1, d_part, post)]
  out_ref[...] = dk._matvec(x2, w)           # rounded once the parts are added


def _proj_kernel(gate_ref, ple_ref, w_ref, out_ref, *, bn, at, rnd):
  """Columns [c * bn, (c + 1) * bn) of gelu(gate) * ple @ W_proj; the layer's input is
  [at, at + P) of ple's row (every layer's inputs, [B, L * P])."""
  b, c = pl.program_id(0), pl.program_id(1)
  p = w_ref.shape[0]
  bk = dk._rows_per_chunk(p, bn)
  spans = dk._spans(p, bk)
  gate = [rnd(sum(gate_ref[b, s, ds] for s in range(gate_ref.shape[1]))) for ds in spans]
  ple = [dk._f32(ple_ref[b, ds]) for ds in dk._spans(p, bk, at)]
  w = [w_ref[ds, dk._columns(c, bn)] for ds in spans]
  g = [rnd(rnd(matvec.gelu_tanh(gc)) * pc) for gc, pc in zip(gate, ple)]
  out_ref[...] = rnd(dk._matvec(g, w))


def _finish_kernel(*refs, rows, eps, rnd, zeros, with_next):
  """Row r: x = (x2 + norm(p) * w) * scalar, and (with_next) norm(x) * the next layer's weight
  (`store_layer_end`)."""
  (x1_ref, d_ref, post_ref, p_ref, norm_ref, scalar_ref), outs = finish_refs(refs, 6, with_next)
  r = pl.program_id(0)
  src = jnp.minimum(r, rows - 1)
  n = x1_ref.shape[1]
  spans = _spans(n)
  x2 = _x2(x1_ref, d_ref, post_ref, src, spans, n, eps, rnd)
  p = [dk._f32(p_ref[src, ds]) for ds in spans]
  w = [dk._f32(norm_ref[ds]) for ds in spans]
  scalar = rnd(dk._f32(scalar_ref[0]))
  x = [rnd(rnd(a + c) * scalar) for a, c in zip(x2, dk._norm(p, w, n, eps, rnd))]
  store_layer_end(x, r, rows, spans, *outs, n=n, eps=eps, rnd=rnd, zeros=zeros)


def _attention_end_kernel(*refs, rows, eps, rnd, zeros, with_next):
  """Row r: x1 = x + norm(a) * w (the residual after attention), and (with_next) norm(x1) * the
  MLP's pre-norm weight (`store_layer_end`)."""
  (x_ref, a_ref, post_ref), outs = finish_refs(refs, 3, with_next)
  r = pl.program_id(0)
  src = jnp.minimum(r, rows - 1)
  spans = _spans(x_ref.shape[1])
  x1 = _x2(x_ref, a_ref, post_ref, src, spans, x_ref.shape[1], eps, rnd)
  store_layer_end(x1, r, rows, spans, *outs, n=x_ref.shape[1], eps=eps, rnd=rnd, zeros=zeros)


def attention_end(x, a, p: dict, cfg: ModelConfig):
  """`model.block`'s step from the o projection to the MLP (ATTENTION_END): one kernel a
  position for x + rms_norm(a) * post_attn_norm and its pre-FFW norm.

  Args:
    x: [B, T, D] the layer's input; a: [R, T, D] the o projection's output (R >= B rows at T = 1:
      the rows past B `quant.einsum`'s padding, ignored).
    p: the layer's parameters (post_attn_norm, pre_ffw_norm, mlp).
  Returns:
    (x1 [B, T, D] the residual after attention, the MLP's normed input: [B, T, D], or [2, 1, D]
    with the padded row its gate|up projection takes, `rows_for`).
  """
  shape, dim = x.shape, x.shape[-1]
  b = shape[0] * shape[1]
  mlp = p["mlp"]
  rows = rows_for(mlp["gate_up"] if "gate_up" in mlp else mlp["gate"], b)
  return call_finish(functools.partial(_attention_end_kernel, eps=cfg.rms_eps,
                                       rnd=dk._rounder(cfg.dtype)),
                     [x.reshape(b, dim), a.reshape(-1, dim), p["post_attn_norm"]], shape,
                     x.dtype, "attention_end", next_norm=p["pre_ffw_norm"], next_rows=rows)


def finish_refs(refs, ins: int, with_next: bool):
  """A finish kernel's refs split: (its `ins` inputs, (next_ref, x_ref, xn_ref)), the next
  layer's norm weight and xn_ref None without with_next (`call_finish`'s order)."""
  if with_next:
    return refs[:ins], refs[ins:]
  return refs[:ins], (None, refs[ins], None)


def store_layer_end(x, r, rows, spans, next_ref, x_ref, xn_ref, *, n, eps, rnd, zeros,
                    one_reduction=None):
  """A finish kernel's stores of row r: the layer's output x (chunks), and where xn_ref is given
  norm(x) * the next layer's weight (`dk._norm`'s `one_reduction`), the padding rows r >= rows
  zero (`zeros`) or row rows - 1 again."""
  dk._store_chunks(x_ref, spans, x)
  if xn_ref is None:
    return
  w_next = [dk._f32(next_ref[ds]) for ds in spans]
  for ds, c in zip(spans, dk._norm(x, w_next, n, eps, rnd, one_reduction=one_reduction)):
    xn_ref[ds] = (jnp.where(r < rows, c, 0.0) if zeros else c).astype(xn_ref.dtype)


def call_finish(kernel, ins: list, shape, dtype, name: str, *, next_norm=None, next_rows: int = 0):
  """A layer's finish kernel over its B * T positions, grid (R,): R = next_rows with next_norm,
  else B * T. `kernel(*ins, [next_norm], x_ref, [xn_ref], rows=B * T, zeros=, with_next=)`
  writes row r's output (`finish_refs`, `store_layer_end`).

  Returns:
    (x [B, T, D], the next layer's normed input or None: [B, T, D], or [2, 1, D] padded).
  """
  b, dim = shape[0] * shape[1], shape[-1]
  with_next = next_norm is not None
  outs = [((b, dim), dtype, (None, dim), lambda r: (jnp.minimum(r, b - 1), 0))]
  if with_next:
    ins = [*ins, next_norm]
    outs.append(((next_rows, dim), dtype, (None, dim), lambda r: (r, 0)))
  res = dk._call(functools.partial(kernel, rows=b, zeros=quant.PAD_ROWS_WITH == "zeros",
                                   with_next=with_next),
                 (next_rows if with_next else b,), ins, outs, name)
  if not with_next:
    return res[0].reshape(shape), None
  xn = res[1]
  return res[0].reshape(shape), (xn.reshape(shape) if next_rows == b else xn[:, None])


def rows_for(w, b: int) -> int:
  """Rows of a b-row input to a matmul with weight w as `quant.einsum` runs it: two for one
  row where it pads (float weights; an int8 one may take `matvec`'s one-row kernel), else b."""
  return 2 if b == 1 and quant.pads_one_row(w) and not quant.is_quantized(w) else b


def _gate_split(d: int, p: int) -> tuple[int, int, int]:
  """(parts S, rows a part, bn) of the gate GEMM [d, p] (`drafter_kernels` tiling)."""
  bn = dk._cols(p, d)
  parts = want = dk._split(d // 16, 16 * bn)
  want *= GATE_PARTS
  while parts < want and (d // 16) % (2 * parts) == 0:
    parts *= 2
  return parts, d // parts, bn


def tail(p: dict, x1, d, ple, cfg: ModelConfig, *, layer: int, next_norm=None,
         next_rows: int = 0):
  """The end of layer p after its MLP.

  Every position is a row of the kernels (B * T of them).

  Args:
    p: the layer's parameters (post_ffw_norm, ple.gate, ple.proj, ple.norm, layer_scalar).
    x1: [B, T, D] the residual after attention; d: [R, T, D] the MLP's down projection (R >= B
      rows at T = 1: the rows past B `quant.einsum`'s padding, ignored).
    ple: [B, T, L, P] every layer's input (`model.per_layer_inputs`), of which the kernel reads
      `layer`'s (a slice of it passed to a kernel would be a copy kernel of its own).
    next_norm: the next layer's pre-attention norm weight [D] (None: the last layer).
    next_rows: rows of the next layer's normed input: B * T, or 2 for one position where its
      projection pads (`rows_for`).
  Returns:
    (x [B, T, D] the layer's output, the next layer's normed input or None: [B, T, D], or
    [2, 1, D] padded).
  """
  rnd = dk._rounder(cfg.dtype)
  shape, dim = x1.shape, x1.shape[-1]
  b = shape[0] * shape[1]
  pdim = ple.shape[-1]
  eps = cfg.rms_eps
  x1, d, ple = x1.reshape(b, dim), d.reshape(-1, dim), ple.reshape(b, -1)
  post, gate_w, proj_w = p["post_ffw_norm"], p["ple"]["gate"], p["ple"]["proj"]
  parts, rows, bn = _gate_split(dim, pdim)
  (gate,) = dk._call(functools.partial(_gate_kernel, rows=rows, bn=bn, eps=eps, rnd=rnd),
                     (b, pdim // bn, parts), [x1, d, post, gate_w],
                     [dk._parts(b, parts, pdim, bn)], "ple_gate")
  bn = dk._cols(dim, pdim)
  (proj,) = dk._call(functools.partial(_proj_kernel, bn=bn, at=layer * pdim, rnd=rnd),
                     (b, dim // bn),
                     [gate, ple, proj_w], [dk._vec(b, dim, bn)], "ple_proj")
  return call_finish(functools.partial(_finish_kernel, eps=eps, rnd=rnd),
                     [x1, d, post, proj, p["ple"]["norm"], p["layer_scalar"]], shape, x1.dtype,
                     "ple_finish", next_norm=next_norm, next_rows=next_rows)
