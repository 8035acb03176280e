"""Few-row matmuls as Pallas (Triton) kernels: routed experts and int8 weights on GPUs.

A decode step at batch 1 multiplies one activation row by each weight, so it is a pass over the
weights: its floor is bytes / HBM bandwidth. Two of the model's matmuls miss that floor under
XLA on GPUs, because XLA cannot express the read the step needs:
  * routed experts (MoE): XLA has no in-place read of the experts a token routes to; it gathers
    them into a copy first (or runs grouped `ragged_dot`s with a large fixed cost);
  * int8 weights: XLA converts them to bf16 in a pass of its own before its GEMM, so the step
    moves more bytes than the bf16 model.
`gathered_matmul(x [P, K], w [E, K, N], idx [P])` reads expert idx[p] in place for row p, and
`matmul(x [M, K], w [K, N])` reads int8 weights as int8 and converts them in registers (the
per-column scales are applied to the output). Both split the work into (output columns /
block_n) x split_k programs, each streaming a [K / split_k, block_n] slab of weights in block_k
chunks; partial sums over the split are added afterwards. One row goes through multiply-and-sum,
several through a dot on 16 padded rows.

Measured on an H200 (experiments/results/kernel_probe_h200.json, runs J and K of
experiments/NOTES.md): 26B-A4B decode 5.43 -> 4.03 ms at batch 1 and 16.1 -> 7.25 ms at batch 8
(the kernel streams routed experts at 2.7-3.8 TB/s); the 31B shape with int8 weights 19.7 ->
15.2 ms at batch 1. For bf16 dense weights the kernel is not faster than
XLA's GEMM (E4B's MLP 2.7 vs 2.9 TB/s; the E4B step 4.78 vs 4.13 ms), nor for int8 weights with
several rows (31B, 5 positions: 18.7 vs 14.7 ms), so `quant` uses it only for one-row int8
matmuls of large weights and `layers` for routed experts.

`expert_ffn` (with FOLD_EXPERT_FFN, off until measured) runs a token's experts' whole MLP as
these two calls with nothing between them: the gate|up call reads each token's row once for its
k experts (no broadcast copy of the row), and the down call adds the gate|up call's split-K
parts and applies gelu(gate) * up in its own loads (no reduction or GELU kernel between). On an
H200 (run BZ's profile, `results/step_profile_finish2_moe_h200.json`) the two XLA kernels this
removes (the row's broadcast to its 8 experts, the parts' sum with GELU * up) take ~3.4 us of
each 26B-A4B layer at batch 1 (~0.1 ms of a 3.41 ms step); the down call's parts are still
added by XLA (1.4 us), as before.

Where they run: `enabled()` (GPU, one device, not switched off with GEMMA_MTP_KERNELS=off) and
`block_config` finds a tiling (column and contraction sizes with power-of-two divisors of at
least 32); otherwise callers keep XLA's ops. Off the GPU the kernels run in Pallas's interpreter
(`interpret=True`), which is how the tests check them on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MAX_ROWS = 16            # rows handled by one dot (padded); more rows use XLA's GEMM
TARGET_PROGRAMS = 512    # enough thread blocks for a few waves over an H200's 132 SMs
# int8 weights of fewer elements stay with XLA (quant.einsum): on an H200, at one row, the kernel
# reads int8 weights of 26M elements and more 1.2-1.4x faster than XLA, smaller ones about as
# fast (E4B's q projection [2560, 2048]: 7.6 vs 7.3 us; experiments/results/kernel_probe_h200.json).
MIN_INT8_SIZE = 16 << 20
ENV = "GEMMA_MTP_KERNELS"  # auto (default): GPU and one device; on; off
# `layers.expert_outputs` through `expert_ffn` where `folds` says. Built in session 25, not
# measured yet (step_probe variant `fused_moe_fold`).
FOLD_EXPERT_FFN = False
# The folded down call's contraction split (None: `block_config`'s, 11 parts at 26B-A4B's batch
# 1, added by XLA after it; 1: one part, 176 programs each reading a whole 704-row slab, and no
# sum kernel). Unmeasured (step_probe variant `fused_moe_fold_split1`).
FOLD_DOWN_SPLIT = None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tiling of one kernel call: block_n output columns per program, the contraction split into
  split_k ranges each read in block_k chunks, Triton's warps and pipeline stages."""

  block_n: int
  block_k: int
  split_k: int
  num_warps: int = 4
  num_stages: int = 3


def switch_mode(env: str) -> str:
  """The setting of the Pallas kernels' switch `env`: 'auto' (the default), 'on' or 'off'."""
  mode = os.environ.get(env, "auto").lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"{env} must be auto, on or off, got {mode!r}")
  return mode


def switch(env: str) -> bool:
  """The Pallas kernels' switch `env` (auto, the default: on with one GPU; on; off), read when a
  program is traced."""
  mode = switch_mode(env)
  if mode != "auto":
    return mode == "on"
  return jax.default_backend() == "gpu" and jax.device_count() == 1


def enabled() -> bool:
  """Whether model matmuls use these kernels in programs traced now (see the module doc)."""
  return switch(ENV)


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def block_config(groups: int, k: int, n: int, *, itemsize: int = 2,
                 target_programs: int = TARGET_PROGRAMS) -> BlockConfig | None:
  """A tiling for `groups` weight slabs [k, n] (None: shapes the kernel does not take).

  block_n = 128 columns (256 bytes of bf16 per row read), block_k = 128 (256 for int8), and the
  contraction split into the fewest ranges that give about `target_programs` programs.
  """
  block_n = pow2_divisor(n, 128)
  block_k = pow2_divisor(k, 256 if itemsize == 1 else 128)
  if block_n < 32 or block_k < 32:
    return None
  chunks = k // block_k
  splits = [d for d in range(1, chunks + 1) if chunks % d == 0]
  split = next((d for d in splits if groups * (n // block_n) * d >= target_programs), chunks)
  return BlockConfig(block_n=block_n, block_k=block_k, split_k=split)


def gelu_tanh(x):
  """tanh-approximated GELU (`layers.gelu`) of a float32 value inside a kernel."""
  inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
  return 0.5 * x * (1.0 + jnp.tanh(inner))


def _kernel(idx_ref, x_ref, w_ref, o_ref, *, cfg: BlockConfig, steps: int, rows: int,
            share: int = 1, gated=None):
  """One program: rows of group g times columns [n * block_n, +block_n) of weight idx[g], over
  the contraction range of split s, into o_ref [rows, block_n] (float32 partial sums).

  `share`: groups g read x's row group g // share (a token's k experts, one row). `gated` =
  (half, rnd): x_ref holds another call's split-K parts [S, G, rows, 2 * half] of gate|up, and
  the input is rnd(rnd(gelu(rnd(sum of gate's parts))) * rnd(sum of up's parts))."""
  g, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  e = idx_ref[g]
  cols = pl.ds(pl.multiple_of(n * cfg.block_n, cfg.block_n), cfg.block_n)
  start = s * (steps * cfg.block_k)

  def inputs(at):
    if gated is None:
      return x_ref[g // share, :, pl.ds(at, cfg.block_k)]
    half, rnd = gated
    summed = lambda a: rnd(sum(x_ref[j, g, :, pl.ds(a, cfg.block_k)]
                               for j in range(x_ref.shape[0])))
    return rnd(rnd(gelu_tanh(summed(at))) * summed(at + half))

  def chunk(i):
    at = pl.multiple_of(start + i * cfg.block_k, cfg.block_k)
    return inputs(at), w_ref[e, pl.ds(at, cfg.block_k), cols]

  if rows == 1:
    def body(i, acc):
      xk, wk = chunk(i)
      return acc + jnp.sum(xk.astype(F32).reshape(cfg.block_k, 1) * wk.astype(F32), axis=0)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_n,), F32))
    o_ref[...] = acc.reshape(1, cfg.block_n)
  else:
    def body(i, acc):
      xk, wk = chunk(i)
      return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=F32)
    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, cfg.block_n), F32))


def _call(x: jax.Array, w: jax.Array, idx: jax.Array, cfg: BlockConfig,
          interpret: bool, *, share: int = 1, gated=None, keep_parts: bool = False) -> jax.Array:
  """x [G / share, R, K], w [E, K, N], idx [G] -> [G, R, N] float32 (R is 1 or MAX_ROWS); with
  `keep_parts` the split-K parts [S, G, R, N] unsummed. `gated` (see `_kernel`): x is [S', G, R, 2K]
  parts."""
  rows, k = x.shape[-2], w.shape[1]
  g, n = idx.shape[0], w.shape[-1]
  steps = k // (cfg.split_k * cfg.block_k)
  kernel = functools.partial(_kernel, cfg=cfg, steps=steps, rows=rows, share=share, gated=gated)
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  parts = pl.pallas_call(
      kernel,
      grid=(g, n // cfg.block_n, cfg.split_k),
      in_specs=[whole(idx), whole(x), whole(w)],
      out_specs=pl.BlockSpec((None, None, rows, cfg.block_n), lambda gi, ni, si: (si, gi, 0, ni)),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, g, rows, n), F32),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="few_row_matmul",
  )(idx, x, w)
  if keep_parts:
    return parts
  return parts[0] if cfg.split_k == 1 else jnp.sum(parts, axis=0)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _rows(x: jax.Array) -> tuple[jax.Array, int]:
  """x [G, M, K] padded to the kernel's row count (1 stays 1; 2..MAX_ROWS -> MAX_ROWS)."""
  m = x.shape[1]
  if m == 1 or m == MAX_ROWS:
    return x, m
  return jnp.pad(x, ((0, 0), (0, MAX_ROWS - m), (0, 0))), m


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *,
           cfg: BlockConfig | None = None) -> jax.Array:
  """x [M, K] @ w [K, N] (float, or int8 with per-column `scale` [N]) -> [M, N] float32.

  M <= MAX_ROWS; `cfg` defaults to `block_config` (ValueError if the shapes have no tiling).
  """
  m, k = x.shape
  if m > MAX_ROWS:
    raise ValueError(f"matvec.matmul takes at most {MAX_ROWS} rows, got {m}")
  cfg = cfg or _require_config(1, k, w.shape[1], w.dtype.itemsize)
  xg, m = _rows(x[None])
  y = _call(xg, w[None], jnp.zeros((1,), jnp.int32), cfg, _interpret())[0, :m]
  return y if scale is None else y * scale.astype(F32)


def gathered_matmul(x: jax.Array, w: jax.Array, idx: jax.Array, scale: jax.Array | None = None,
                    *, cfg: BlockConfig | None = None) -> jax.Array:
  """Row p of x [P, K] times expert idx[p] of w [E, K, N] -> [P, N] float32, reading only the
  experts named in idx (int8 w: per-(expert, column) `scale` [E, N])."""
  p, k = x.shape
  cfg = cfg or _require_config(p, k, w.shape[2], w.dtype.itemsize)
  idx = idx.astype(jnp.int32)
  y = _call(x[:, None], w, idx, cfg, _interpret())[:, 0]
  return y if scale is None else y * jnp.take(scale.astype(F32), idx, axis=0)


def folds(x: jax.Array, gate_up, down) -> bool:
  """Whether `layers.expert_outputs` runs as `expert_ffn`: FOLD_EXPERT_FFN, the kernels enabled,
  float expert weights of x's dtype (bf16 or float32) and tilings for both matmuls."""
  if not (FOLD_EXPERT_FFN and enabled() and x.ndim == 2):
    return False
  weights = (gate_up, down)
  if any(not isinstance(w, jax.Array) or w.dtype != x.dtype for w in weights):
    return False    # int8 (a QArray) or another dtype: the two calls of `quant.expert_matmul`
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    return False
  (_, d, two_x), (_, half, n) = gate_up.shape, down.shape
  return (two_x == 2 * half and n == d and block_config(1, d, two_x) is not None
          and block_config(1, half, n) is not None)


def expert_ffn(x: jax.Array, gate_up: jax.Array, down: jax.Array,
               experts: jax.Array) -> jax.Array:
  """Token m's k experts' MLP: (gelu(x[m] @ gate_up[e][:, :X]) * x[m] @ gate_up[e][:, X:]) @
  down[e] for e = experts[m, j] -> [M, k, D] in x's dtype, rounded where `layers.expert_outputs`
  rounds (gate|up's output, the GELU, its product with up, the down projection's output).

  Two kernel calls and nothing between them: gate|up reads each token's row once for its k
  experts and keeps its split-K parts; down adds them and gates them as it loads its input.
  """
  m, k = experts.shape
  (_, d, two_x), half = gate_up.shape, down.shape[1]
  idx = experts.reshape(-1).astype(jnp.int32)
  up_cfg = _require_config(m * k, d, two_x, gate_up.dtype.itemsize)
  down_cfg = _require_config(m * k, half, down.shape[2], down.dtype.itemsize)
  if FOLD_DOWN_SPLIT is not None:
    down_cfg = dataclasses.replace(down_cfg, split_k=FOLD_DOWN_SPLIT)
  parts = _call(x[:, None], gate_up, idx, up_cfg, _interpret(), share=k, keep_parts=True)
  rnd = (lambda v: v) if x.dtype == F32 else (lambda v: v.astype(x.dtype).astype(F32))
  y = _call(parts, down, idx, down_cfg, _interpret(), gated=(half, rnd))
  return y[:, 0].reshape(m, k, -1).astype(x.dtype)


def _require_config(groups, k, n, itemsize) -> BlockConfig:
  cfg = block_config(groups, k, n, itemsize=itemsize)
  if cfg is None:
    raise ValueError(f"no kernel tiling for a [{k}, {n}] weight (each side needs a power-of-two "
                     f"divisor of at least 32)")
  return cfg


__all__ = ["BlockConfig", "switch_mode", "switch", "enabled", "pow2_divisor", "block_config", "matmul",
           "gathered_matmul", "MAX_ROWS", "ENV"]
