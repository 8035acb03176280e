"""int8 weight-only quantization: symmetric absmax scales per output channel.

`quantize_params(params, config)` replaces each large matmul weight of a decoder (attention q,
k, v, o; MLP gate, up, down; PLE gate / projections; MoE expert gate_up / down; optionally the
embedding tables) by a `QArray`: int8 values plus float32 scales, one per output channel. Norms,
scalars, the MoE router and its scales stay float. The quantized tree has the structure of the
float tree with a `QArray` node (children `q`, `scale`) at each quantized weight, so
`model.forward`, prefill, plain and speculative decoding, Orbax checkpoints and sharding take it
unchanged.

Which axes are "output channels": every axis the weight is not contracted over. The contracted
(input) axes are the spec's `fan_in_axes` (params.py), e.g. q [D, N, H] is contracted over D, so
there is one scale per (N, H); o [N, H, D] over (N, H), one scale per D; the tied embedding
[V, D] over D, one scale per vocabulary row (the same scales serve the lookup and the head); the
PLE table [Vp, L, P] over P; an expert's down [E, X, D] over X, one scale per (E, D).

Weights are never dequantized up front: the ops below (`einsum`, `ragged_dot`, `lookup`) read the
int8 values, convert them to the activation dtype inside the matmul, and apply the scale to the
matmul's output, which is exact because the scale is constant along the contracted axes:
    x @ (q * s) = (x @ q) * s.
The compiled program takes the int8 arrays as inputs and its only weight-sized op besides the dot
is the int8 -> activation-dtype convert of its operand; fusing that convert into the matmul (so
that HBM traffic is int8) is XLA's choice (GPU: its Triton GEMM fusion takes such operand
converts; not measured here). On float arrays the ops are the plain jnp / lax ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import matvec
from gemma_mtp import params as params_lib
from gemma_mtp.config import ModelConfig

F32 = jnp.float32
QMAX = 127  # symmetric: q in [-127, 127], so -q is representable and 0 is exact
METHOD = "int8-absmax-per-channel"

# Weights quantized by name (the last key of their path); `embed` only with embeddings=True.
KERNELS = frozenset({"q", "k", "v", "o", "gate", "up", "down", "proj", "gate_up"})
EMBEDDINGS = frozenset({"embed"})


@flax.struct.dataclass
class QArray:
  """A weight w ~= q * scale.

  Attributes:
    q: int8 [*shape], values in [-QMAX, QMAX].
    scale: float32, the shape of q with the contracted (input) axes set to 1: absmax / QMAX of each
      output channel. A size-1 axis of `scale` is a contracted axis (or a size-1 output axis,
      which needs no scale bookkeeping either way).
    dtype: (static) the float dtype the weight stands for. `astype` changes only this (the values
      stay int8); activations produced from the weight (a dequantized embedding row) take it.
  """

  q: jax.Array
  scale: jax.Array
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.q.shape)

  @property
  def ndim(self) -> int:
    return len(self.q.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.q.shape))

  def astype(self, dtype) -> "QArray":
    return self.replace(dtype=jnp.dtype(dtype).name)


def is_quantized(x) -> bool:
  return isinstance(x, QArray)


# ---- quantize / dequantize ---------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=1)
def quantize(w: jax.Array, axes: tuple[int, ...]) -> QArray:
  """Symmetric absmax int8 of `w` with one scale per index of the axes not in `axes`.

  |w - q * scale| <= scale / 2 elementwise (round to nearest; |w| / scale <= QMAX, so no clipping).
  An all-zero channel gets scale 1 (its q is 0). One compiled program per weight shape.
  """
  wf = w.astype(F32)
  absmax = jnp.max(jnp.abs(wf), axis=tuple(axes), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / QMAX, 1.0).astype(F32)
  q = jnp.clip(jnp.round(wf / scale), -QMAX, QMAX).astype(jnp.int8)
  return QArray(q=q, scale=scale, dtype=jnp.dtype(w.dtype).name)


def dequantize(w: QArray | jax.Array) -> jax.Array:
  """q * scale in `w.dtype` (a float array is returned as is)."""
  if not is_quantized(w):
    return w
  return (w.q.astype(F32) * w.scale.astype(F32)).astype(w.dtype)


def quantized_weight(path, spec: params_lib.ParamSpec, *, embeddings: bool) -> bool:
  """Whether the weight at `path` (a key path of the spec tree) is quantized."""
  name = _key_name(path[-1])
  if spec.init != "normal":
    return False
  return name in KERNELS or (embeddings and name in EMBEDDINGS)


def quantize_params(params: Any, config, *, embeddings: bool = False) -> Any:
  """The parameter tree of `config` with its large matmul weights as `QArray`s.

  Args:
    params: float parameter tree (params.py) of `config`.
    config: its ModelConfig.
    embeddings: also quantize the tied embedding / LM head [V, D] (one scale per row) and the PLE
      table [Vp, L, P] (one scale per (row, layer)); for Gemma 4 these are a large share of the
      bytes (E2B: the PLE table alone is most of the parameters).
  Raises:
    ValueError: `params` is already quantized, or fused (`model.fuse_projections`: quantize the
      checkpoint layout, then fuse; `api.quantize_target` does both).
    TypeError: `config` is not a decoder ModelConfig (MTP drafters are not quantized here).
  """
  if not isinstance(config, ModelConfig):
    raise TypeError(f"quantize_params takes a decoder ModelConfig, got {type(config).__name__}")
  if params_lib.is_fused(params):
    raise ValueError("quantize_params: the params are in the fused inference layout; quantize "
                     "model.unfuse_projections(params, config), then fuse the result")
  specs = params_lib.param_specs(config)

  def one(path, spec, w):
    if is_quantized(w):
      raise ValueError(f"weight {_path_name(path)!r} is already quantized")
    if not quantized_weight(path, spec, embeddings=embeddings):
      return w
    return quantize(w, tuple(spec.fan_in_axes))

  return jax.tree_util.tree_map_with_path(one, specs, params, is_leaf=params_lib.is_spec)


def dequantize_params(params: Any) -> Any:
  """The float tree of a quantized tree (every `QArray` -> q * scale in its dtype)."""
  return jax.tree_util.tree_map(dequantize, params, is_leaf=is_quantized)


def cast(params: Any, dtype) -> Any:
  """Every float leaf to `dtype`; a QArray keeps its int8 values and changes its logical dtype."""
  dtype = jnp.dtype(dtype)

  def one(w):
    if is_quantized(w) or jnp.issubdtype(w.dtype, jnp.floating):
      return w.astype(dtype)
    return w

  return jax.tree_util.tree_map(one, params, is_leaf=is_quantized)


def quantized_specs(config, *, embeddings: bool = False) -> Any:
  """The spec tree (params.py) of `quantize_params(..., config, embeddings=...)`.

  A quantized weight becomes QArray(q=ParamSpec int8 [shape], scale=ParamSpec float32 [shape with
  contracted axes 1, their logical axis None]), so `params.abstract_params`, `sharding` and the
  Orbax checkpoint code derive shapes, dtypes and shardings from it as from the float specs.
  """
  specs = params_lib.param_specs(config)

  def one(path, spec):
    if not quantized_weight(path, spec, embeddings=embeddings):
      return spec
    contracted = set(spec.fan_in_axes)
    scale_shape = tuple(1 if a in contracted else n for a, n in enumerate(spec.shape))
    scale_axes = tuple(None if a in contracted else name for a, name in enumerate(spec.axes))
    return QArray(
        q=dataclasses.replace(spec, dtype="int8"),
        scale=dataclasses.replace(spec, shape=scale_shape, axes=scale_axes, init="ones",
                                  fan_in_axes=(), dtype="float32"),
        dtype=jnp.dtype(config.param_dtype).name)

  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=params_lib.is_spec)


def specs_like(params: Any, config) -> Any:
  """The spec tree of `params`: `quantized_specs` if it is quantized, else `param_specs`."""
  q = describe(params)
  if q is None:
    return params_lib.param_specs(config)
  return quantized_specs(config, embeddings=q["embeddings"])


def describe(params: Any) -> dict | None:
  """{"method", "embeddings"} of a quantized tree (what a checkpoint records); None if float."""
  if not any(is_quantized(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized)):
    return None
  return {"method": METHOD, "embeddings": is_quantized(params["embed"])}


def nbytes(params: Any) -> int:
  """Bytes of the stored arrays of a (quantized or float) tree."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(params))


def logit_error(logits: jax.Array, ref: jax.Array) -> dict[str, float]:
  """How far `logits` [..., V] (e.g. of the int8 model) are from `ref` (the float model's).

  Returns {"rms_rel": rms(logits - ref) / rms(ref), "top1_agreement": share of positions with the
  same argmax, "kl": mean KL(softmax(ref) || softmax(logits)) in nats}.
  """
  logits, ref = jnp.asarray(logits, F32), jnp.asarray(ref, F32)
  kl = jnp.sum(jax.nn.softmax(ref) * (jax.nn.log_softmax(ref) - jax.nn.log_softmax(logits)), -1)
  return {"rms_rel": float(jnp.sqrt(jnp.mean((logits - ref) ** 2) / jnp.mean(ref ** 2))),
          "top1_agreement": float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref, -1))),
          "kl": float(jnp.mean(kl))}


# ---- ops that accept a quantized or a float weight ---------------------------------------------

# Backends on which a matmul whose activation has a single row runs on two rows (the second one
# zeros, its result dropped). XLA's GPU compiler turns a one-row dot (batch-1 decoding) into an
# elementwise multiply plus a reduction instead of a GEMM kernel. On an H200 that reduction is up
# to 2.3x slower for small weights (E4B's q projection [2560, 2048]: 25 us vs 11 us on two rows;
# a 26B-A4B expert [2816, 1408]: 22 us vs 13 us) and made a batch-1 decode step slower than a
# 2-position one; padding took E2B's batch-1 step from 3.68 to 2.63 ms and E4B's from 5.41 to
# 4.11 ms (experiments/results/decode_probe_h200.json). Large weights stream about as fast
# either way (31B's MLP [5376, 21504]: 3.61 TB/s as a reduction, 3.55 on two rows) and padding
# every matmul of the 31B shape made its batch-1 step 2.8% slower (16.52 -> 16.98 ms,
# results/benchmark_h200.json runs B and H), so weights of PAD_MAX_WEIGHT_SIZE elements or more
# (31B's MLP, q and o projections, every vocabulary-sized head) keep one row.
PAD_ONE_ROW_BACKENDS = ("gpu",)
PAD_MAX_WEIGHT_SIZE = 32 << 20
# Research knobs, measured on an H200 (experiments/NOTES.md runs AI, AK) and left at the values
# that won there. PAD_MIN_WEIGHT_SIZE: smaller weights keep one row; 1M made the fused 51M-param
# GPU pair slower (plain step 476 -> 493 us, K = 8 round 1,512 -> 1,568 us). PAD_ROWS_WITH: what
# the second row holds, "zeros" (a pad kernel of its own before the GEMM) or "copy" (row 0 again:
# a broadcast XLA can fuse into the GEMM's operand); "copy" sped up that pair (476 -> 464 us,
# 1,512 -> 1,455 us) but slowed E2B (2.578 -> 2.675 ms) and E4B (4.030 -> 4.057 ms).
PAD_MIN_WEIGHT_SIZE = 0
PAD_ROWS_WITH = "zeros"


def pad_one_row() -> bool:
  """Whether one-row matmuls are padded to two rows on the backend being traced for."""
  return jax.default_backend() in PAD_ONE_ROW_BACKENDS


def pads_one_row(w) -> bool:
  """Whether `einsum` gives a one-row input of weight `w` a second row (`PAD_ROWS_WITH`) before
  the matmul, on the backend being traced for."""
  return pad_one_row() and PAD_MIN_WEIGHT_SIZE <= math.prod(w.shape) < PAD_MAX_WEIGHT_SIZE


def _one_row(spec: str, x: jax.Array) -> bool:
  """True when x's rows (its axes not shared with the weight) number one and lead its shape."""
  ins, out = spec.replace(" ", "").split("->")
  x_letters, w_letters = ins.split(",")
  if x_letters.startswith("..."):   # one '.' per axis the ellipsis stands for
    if not out.startswith("..."):
      return False
    x_letters, out = "." * (x.ndim - len(x_letters) + 3) + x_letters[3:], "."
  if not x_letters or x_letters[0] in w_letters or not out.startswith(x_letters[0]):
    return False
  return all(n == 1 for c, n in zip(x_letters, x.shape) if c not in w_letters)


def einsum(spec: str, x: jax.Array, w: QArray | jax.Array, *,
           preferred_element_type=None, padded_rows: bool = False) -> jax.Array:
  """`jnp.einsum(spec, x, w)` with w a float array or a QArray.

  For a QArray: einsum(x, q) in float32 accumulation, times the scales arranged along the output
  axes, cast to `preferred_element_type` (default: the result type of x and w.dtype). Every output
  channel axis of w must appear in the output (true of every weight of the model).

  With `matvec.enabled()` (GPUs), a one-row bf16 activation times a large int8 weight whose
  leading axes are the contracted ones goes through the Pallas kernel, which reads the int8
  values as int8 (`_kernel_einsum`; XLA converts them to bf16 in a pass of its own). Otherwise
  a one-row x is padded to two rows where `pad_one_row()` says so (same values: row 0 is
  computed alone). `padded_rows`: return both rows of a padded matmul (row 0 the result; for a
  consumer that reads row 0 itself, where the slice would be a kernel of its own).
  """
  if matvec.enabled():
    y = _kernel_einsum(spec, x, w, preferred_element_type)
    if y is not None:
      return y
  if _one_row(spec, x) and pads_one_row(w):
    if PAD_ROWS_WITH == "copy":
      x2 = jnp.broadcast_to(x, (2,) + x.shape[1:])
    else:
      x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    y = _einsum(spec, x2, w, preferred_element_type=preferred_element_type)
    return y if padded_rows else y[:1]
  return _einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _matmul_layout(spec: str, x: jax.Array, w) -> tuple[tuple, int, tuple] | None:
  """(row shape, contracted size, output-channel shape) when `spec` is x [rows..., c...] times
  w [c..., o...] -> [rows..., o...] (w's leading axes contracted, in x's trailing order)."""
  ins, out = spec.replace(" ", "").split("->")
  x_letters, w_letters = ins.split(",")
  if "..." in w_letters or len(w_letters) != w.ndim:
    return None
  if x_letters.startswith("..."):
    if not out.startswith("..."):
      return None
    extra = "".join(chr(0x100 + i) for i in range(x.ndim - len(x_letters) + 3))
    x_letters, out = extra + x_letters[3:], extra + out[3:]
  con = "".join(c for c in w_letters if c in x_letters)
  rows = x_letters[:len(x_letters) - len(con)]
  if (len(x_letters) != x.ndim or not x_letters.endswith(con) or not w_letters.startswith(con)
      or out != rows + w_letters[len(con):]):
    return None
  return tuple(x.shape[:len(rows)]), math.prod(w.shape[:len(con)]), tuple(w.shape[len(con):])


def _kernel_einsum(spec, x, w, preferred_element_type):
  """`einsum` through `matvec.matmul`, or None where the kernel does not apply."""
  if (not is_quantized(w) or w.q.dtype != jnp.int8 or x.dtype != jnp.bfloat16
      or w.size < matvec.MIN_INT8_SIZE):
    return None
  layout = _matmul_layout(spec, x, w)
  if layout is None:
    return None
  row_shape, k, out_shape = layout
  m, n = math.prod(row_shape), math.prod(out_shape)
  cfg = matvec.block_config(1, k, n, itemsize=1)
  if m != 1 or cfg is None:   # several rows: XLA's fused int8 GEMM is faster (matvec)
    return None
  y = matvec.matmul(x.reshape(m, k), w.q.reshape(k, n), w.scale.reshape(n), cfg=cfg)
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, jnp.dtype(w.dtype))
  return y.reshape(row_shape + out_shape).astype(out_dtype)


def _einsum(spec, x, w, *, preferred_element_type):
  if not is_quantized(w):
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, jnp.dtype(w.dtype))
  y = jnp.einsum(spec, x, w.q.astype(x.dtype), preferred_element_type=F32)
  return (y * _output_scale(spec, w)).astype(out_dtype)


def _output_scale(spec: str, w: QArray) -> jax.Array:
  """w.scale arranged to broadcast against the output of `spec` (e.g. 'BTD,DNH->BTNH' -> [N, H])."""
  ins, out = spec.replace(" ", "").split("->")
  w_letters = ins.split(",")[1]
  if "..." in w_letters or len(w_letters) != w.ndim:
    raise ValueError(f"einsum {spec!r}: the weight operand needs one letter per axis of {w.shape}")
  if "..." in out and not out.startswith("..."):
    raise ValueError(f"einsum {spec!r}: an ellipsis is supported only at the start of the output")
  out = out.replace("...", "")
  contracted = tuple(a for a, n in enumerate(w.scale.shape) if n == 1)
  chan = [c for a, c in enumerate(w_letters) if a not in contracted]
  missing = [c for c in chan if c not in out]
  if missing:
    raise ValueError(f"einsum {spec!r}: output channel axes {missing} of the quantized weight are "
                     "contracted")
  s = jnp.squeeze(w.scale.astype(F32), axis=contracted)                      # [chan...]
  order = [c for c in out if c in chan]
  s = jnp.transpose(s, [chan.index(c) for c in order])
  return s.reshape([s.shape[order.index(c)] if c in chan else 1 for c in out])


def ragged_dot(x: jax.Array, w: QArray | jax.Array, group_sizes: jax.Array, *,
               row_groups: jax.Array) -> jax.Array:
  """`lax.ragged_dot(x [M, K], w [G, K, N], group_sizes)` with w a float array or a QArray.

  Args:
    row_groups: [M] int32, the group of each row of x (rows sorted by group), to pick the scales.
  """
  if not is_quantized(w):
    return jax.lax.ragged_dot(x, w, group_sizes)
  y = jax.lax.ragged_dot(x, w.q.astype(x.dtype), group_sizes, preferred_element_type=F32)
  s = jnp.squeeze(w.scale.astype(F32), axis=1)[row_groups]                  # [M, N]
  return (y * s).astype(jnp.result_type(x.dtype, jnp.dtype(w.dtype)))


def expert_matmul(x: jax.Array, w: QArray | jax.Array, experts: jax.Array) -> jax.Array:
  """Per (token m, slot j): x times expert experts[m, j] of w [E, D, N] -> [M, k, N].

  x is [M, D] (the same row for a token's k experts) or [M, k, D] (one row per pair). With
  `matvec.enabled()` and bf16 activations the chosen experts are read in place by
  `matvec.gathered_matmul` (an [M, D] x copied to a row per pair first, unless
  `matvec.SHARED_ROWS`); otherwise their weights are gathered ([M, k, D, N]) and contracted.
  """
  m, k = experts.shape
  values = w.q if is_quantized(w) else w
  cfg = matvec.block_config(m * k, w.shape[1], w.shape[2], itemsize=values.dtype.itemsize)
  if (matvec.enabled() and cfg is not None and x.dtype == jnp.bfloat16
      and values.dtype in (jnp.bfloat16, jnp.int8)):
    scale = jnp.squeeze(w.scale, axis=1) if is_quantized(w) else None
    if x.ndim == 2 and matvec.SHARED_ROWS:       # each pair reads its token's row in place
      rows, per_row = x, k
    else:
      rows = (jnp.broadcast_to(x[:, None], (m, k, x.shape[-1])) if x.ndim == 2
              else x).reshape(m * k, -1)
      per_row = 1
    y = matvec.gathered_matmul(rows, values, experts.reshape(-1), scale, cfg=cfg,
                               per_row=per_row)
    return y.reshape(m, k, -1).astype(jnp.result_type(x.dtype, jnp.dtype(w.dtype)))
  spec = "MD,MkDF->MkF" if x.ndim == 2 else "MkD,MkDF->MkF"
  return einsum(spec, x, take(w, experts))


def take(w: QArray | jax.Array, idx: jax.Array) -> QArray | jax.Array:
  """Rows w[idx] along axis 0 (an output-channel axis for a QArray); idx [...] -> [..., *rest]."""
  if not is_quantized(w):
    return jnp.take(w, idx, axis=0)
  if w.scale.shape[0] != w.q.shape[0]:
    raise ValueError(f"take: axis 0 of a quantized weight {w.shape} is contracted")
  return w.replace(q=jnp.take(w.q, idx, axis=0), scale=jnp.take(w.scale, idx, axis=0))


def slice_axis(w: QArray | jax.Array, axis: int, n: int) -> QArray | jax.Array:
  """w[..., :n, ...] along `axis` (an output axis of a QArray: its scales are sliced alike)."""
  cut = lambda a: jax.lax.slice_in_dim(a, 0, min(n, a.shape[axis]), axis=axis)
  if not is_quantized(w):
    return cut(w)
  return w.replace(q=cut(w.q), scale=cut(w.scale))


def concatenate(ws, axis: int) -> QArray | jax.Array:
  """Weights joined along `axis`, an output axis (a QArray's scales are joined alike).

  Raises:
    ValueError: float and quantized weights mixed, or `axis` contracted in a quantized weight.
  """
  quantized = [is_quantized(w) for w in ws]
  if not any(quantized):
    return jnp.concatenate(ws, axis=axis)
  if not all(quantized):
    raise ValueError("concatenate: float and quantized weights mixed")
  if any(w.scale.shape[axis] != w.q.shape[axis] for w in ws):
    raise ValueError(f"concatenate: axis {axis} is contracted in a quantized weight")
  return ws[0].replace(q=jnp.concatenate([w.q for w in ws], axis=axis),
                       scale=jnp.concatenate([w.scale for w in ws], axis=axis))


def split(w: QArray | jax.Array, sizes, axis: int) -> list[QArray | jax.Array]:
  """The inverse of `concatenate`: pieces of `sizes` along the output axis `axis`."""
  cuts = list(np.cumsum(sizes)[:-1])
  if not is_quantized(w):
    return jnp.split(w, cuts, axis=axis)
  return [w.replace(q=q, scale=s) for q, s in zip(jnp.split(w.q, cuts, axis=axis),
                                                   jnp.split(w.scale, cuts, axis=axis))]


def lookup(table: QArray | jax.Array, idx: jax.Array) -> jax.Array:
  """Embedding rows table[idx] as floats in the table's dtype."""
  return dequantize(take(table, idx))


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_name(path) -> str:
  return ".".join(_key_name(k) for k in path)


__all__ = ["QArray", "quantize", "dequantize", "quantize_params", "dequantize_params",
           "quantized_specs", "specs_like", "cast", "describe", "nbytes", "logit_error", "einsum",
           "ragged_dot", "expert_matmul", "take", "lookup", "is_quantized", "concatenate", "split"]
