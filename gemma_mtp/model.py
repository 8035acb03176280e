"""The Gemma 4 text decoder as a pure function of (params, tokens, cache).

`forward` runs in one of two modes:
  * no cache: causal self-attention within `tokens` (scoring, training, and the first half of a
    prefill; `prefill` then writes the K/V into a fresh cache);
  * with a cache: `tokens` are the next T positions of every row (plain decoding T = 1, speculative
    verification T = K + 1). Their K/V are written at `cache.length` and they attend to the cache;
    with `tree`, the T = N tokens are the nodes of a draft tree (tree.py): written at
    `cache.length + n`, positioned at `cache.length + depth[n]`, each attending to the cache and
    to its ancestors.
The caller commits positions by advancing `cache.length` (see kv_cache.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import decode_attention
from gemma_mtp import kv_cache as kvc
from gemma_mtp import layers
from gemma_mtp import moe_kernels
from gemma_mtp import params as params_lib
from gemma_mtp import ple_kernels
from gemma_mtp import quant
from gemma_mtp import tree as tree_lib
from gemma_mtp.config import FULL, SLIDING, ModelConfig
from gemma_mtp.kv_cache import KVCache

F32 = jnp.float32


@flax.struct.dataclass
class Tap:
  """K/V of one tap layer as the drafter reads it.

  Attributes:
    k, v: [B, S, K, H] keys (normed, RoPE'd) and values (normed).
    idx: [B, S] int32 sequence index of each slot (-1: empty).
  """

  k: jax.Array
  v: jax.Array
  idx: jax.Array


@flax.struct.dataclass
class ForwardOutput:
  """Attributes:
    logits: [B, T, V] float32 (softcapped), or [B, 1, V] with `last_only`.
    hidden: [B, T, D] final-normed hidden states (what the drafter reads).
    taps: {'sliding': Tap, 'full': Tap} for the layers of `config.tap_layers`.
    cache: the cache with this chunk's K/V written (None in no-cache mode).
    kv: without a cache, the chunk's (k, v) per layer (None for KV-shared layers), for `prefill`.
  """

  logits: jax.Array
  hidden: jax.Array
  taps: dict
  cache: KVCache | None
  kv: tuple | None


def embed_tokens(params: dict, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x0 = E[tok] * sqrt(D), the scale rounded to the parameter dtype as the reference does. [B,T,D]."""
  table = params["embed"]
  x = quant.lookup(table, tokens) * jnp.asarray(cfg.embed_scale, table.dtype)
  return x.astype(cfg.dtype)


def per_layer_inputs(params: dict, tokens: jax.Array, x0: jax.Array, cfg: ModelConfig) -> jax.Array:
  """PLE: (RMSNorm(x0 @ W / sqrt(D)) + E_ple[tok] * sqrt(P)) / sqrt(2). Returns [B, T, L, P]."""
  p = params["ple"]
  table = p["embed"]
  n = cfg.num_layers  # a layer prefix (self-drafter) uses the first n layers' slices
  tok = jnp.where((tokens >= 0) & (tokens < table.shape[0]), tokens, 0)
  scale = jnp.asarray(np.sqrt(cfg.per_layer_dim), table.dtype)
  ple_tok = quant.lookup(table, tok)[:, :, :n] * scale
  proj = quant.slice_axis(p["proj"], 1, n).astype(x0.dtype)
  ctx = quant.einsum("BTD,DLP->BTLP", x0, proj) * (cfg.embed_dim**-0.5)
  ctx = layers.rms_norm(ctx, p["norm"], eps=cfg.rms_eps)
  return ((ctx + ple_tok.astype(x0.dtype)) * (2.0**-0.5)).astype(x0.dtype)


@functools.cache
def rope_inv_freq(cfg: ModelConfig, kind: str) -> np.ndarray:
  """RoPE inverse frequencies [H/2] of `cfg`'s sliding or full layers (a drafter config too)."""
  if kind == FULL:
    return layers.rope_inv_freq(cfg.global_head_dim, cfg.global_rope_theta,
                                cfg.global_rotary_fraction)
  return layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta)


def project_kv(p: dict, xn: jax.Array, positions: jax.Array, cfg: ModelConfig, kind: str):
  """Keys (k-normed, RoPE'd) and values (weightless v-norm) of a layer that owns K/V.

  Full layers with k_eq_v take their values from the raw key projection.
  """
  k_raw = quant.einsum("BTD,DKH->BTKH", xn, p["k"])
  v_raw = quant.einsum("BTD,DKH->BTKH", xn, p["v"]) if "v" in p else k_raw
  k = layers.apply_rope(layers.rms_norm(k_raw, p["k_norm"], eps=cfg.rms_eps), positions,
                        rope_inv_freq(cfg, kind))
  v = layers.rms_norm(v_raw, eps=cfg.rms_eps)
  return k, v


def project_q(p: dict, xn: jax.Array, positions: jax.Array, cfg: ModelConfig, kind: str):
  q = quant.einsum("BTD,DNH->BTNH", xn, p["q"])
  return layers.apply_rope(layers.rms_norm(q, p["q_norm"], eps=cfg.rms_eps), positions,
                           rope_inv_freq(cfg, kind))


def project_fused(p: dict, xn: jax.Array, positions: jax.Array, cfg: ModelConfig, kind: str):
  """q, k, v of a layer in the fused layout (`fuse_projections`): one matmul, then one norm over
  every head (q_norm's weight on the q heads, k_norm's on the k heads, none on the v heads) and
  one RoPE over the q and k heads; the same values as `project_q` + `project_kv`."""
  n = cfg.num_heads
  with_v = "qkv" in p
  raw = quant.einsum("BTD,DNH->BTNH", xn, p["qkv"] if with_v else p["qk"])
  total, h = raw.shape[2], raw.shape[3]
  kv = (total - n) // (2 if with_v else 1)
  weight = jnp.concatenate([jnp.broadcast_to(p["q_norm"], (n, h)),
                            jnp.broadcast_to(p["k_norm"], (kv, h)),
                            jnp.ones((total - n - kv, h), p["q_norm"].dtype)])
  normed = layers.rms_norm(raw, weight, eps=cfg.rms_eps)
  qk = layers.apply_rope(normed[:, :, :n + kv], positions, rope_inv_freq(cfg, kind))
  if with_v:
    v = normed[:, :, n + kv:]
  else:   # k_eq_v: the values are the raw keys, v-normed
    v = layers.rms_norm(raw[:, :, n:], eps=cfg.rms_eps)
  return qk[:, :, :n], qk[:, :, n:], v


def fuse_projections(params: dict, config: ModelConfig, *, donate: bool = False) -> dict:
  """The inference layout of a target's parameters: fewer, larger matmuls per layer.

  In each layer that owns K/V, q [D, N, H], k [D, K, H] and v [D, K, H] become one `qkv`
  [D, N + 2K, H] (`qk` [D, N + K, H] for k_eq_v layers); in each dense MLP, gate [D, I] and up
  [D, I] become one `gate_up` [D, 2I]. `forward` (and everything built on it) computes the same
  values from either layout; at batch 1 a step runs 3 matmuls fewer per layer, each of which
  costs a few microseconds of fixed time on a GPU (experiments/NOTES.md, run O). Quantized
  weights (quant.py) are joined with their scales. For inference on one device: the sharding
  rules and checkpoint writers take the checkpoint layout (`unfuse_projections` undoes this).

  Args:
    params: a target's parameter tree (float or int8), in the checkpoint layout.
    config: its ModelConfig.
    donate: delete each original weight once joined (peak memory: one layer's weights more,
      not a second copy of the model); `params` must not be used afterwards.
  """
  if params_lib.is_fused(params):
    return params

  def join(parent, names, new):
    ws = [parent[k] for k in names]
    out = {k: v for k, v in parent.items() if k not in names}
    out[new] = quant.concatenate(ws, axis=1)
    if donate:
      _delete(ws)
    return out

  new_layers = []
  for i, p in enumerate(params["layers"]):
    p = dict(p)
    attn = p["attn"]
    if attn["q"].shape[1] != config.num_heads:   # project_fused splits by config.num_heads
      raise ValueError(f"fuse_projections: layer {i} has {attn['q'].shape[1]} query heads, the "
                       f"config {config.num_heads}")
    if "k" in attn:   # a layer that owns K/V (KV-shared layers project only q)
      names = ("q", "k", "v") if "v" in attn else ("q", "k")
      p["attn"] = join(attn, names, "qkv" if "v" in attn else "qk")
    p["mlp"] = join(p["mlp"], ("gate", "up"), "gate_up")
    new_layers.append(p)
  return {**params, "layers": type(params["layers"])(new_layers)}


def unfuse_projections(params: dict, config: ModelConfig, *, donate: bool = False) -> dict:
  """The checkpoint layout of parameters made by `fuse_projections` (`donate` as there)."""
  def cut(w, sizes):
    pieces = quant.split(w, sizes, 1)
    if donate:
      _delete(w)
    return pieces

  new_layers = []
  for i, p in enumerate(params["layers"]):
    p, attn = dict(p), dict(p["attn"])
    for fused, names in (("qkv", ("q", "k", "v")), ("qk", ("q", "k"))):
      if fused in attn:
        kv = config.layer_kv_heads(i)
        attn.update(zip(names, cut(attn.pop(fused), [config.num_heads] + [kv] * (len(names) - 1))))
    p["attn"] = attn
    if "gate_up" in p["mlp"]:
      mlp = dict(p["mlp"])
      mlp["gate"], mlp["up"] = cut(mlp.pop("gate_up"), [config.layer_mlp_dim(i)] * 2)
      p["mlp"] = mlp
    new_layers.append(p)
  return {**params, "layers": type(params["layers"])(new_layers)}


def _delete(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):   # host (numpy) leaves are left to the garbage collector
      leaf.delete()


def feed_forward(p: dict, x: jax.Array, cfg: ModelConfig, *, router_kernels: bool = False
                 ) -> jax.Array:
  """Dense GeGLU FFN, or (MoE models) shared dense MLP + routed experts; includes the FFN norms.
  `router_kernels`: the MoE router as `moe_kernels.route` (see `moe_kernels.choose`)."""
  h = layers.mlp(layers.rms_norm(x, p["pre_ffw_norm"], eps=cfg.rms_eps), p["mlp"])
  if "moe" in p:
    moe = p["moe"]
    h = layers.rms_norm(h, moe["dense_post_norm"], eps=cfg.rms_eps)
    router = functools.partial(moe_kernels.route, cfg=cfg) if router_kernels else None
    h = h + layers.moe(x, moe, top_k=cfg.num_experts_per_token, eps=cfg.rms_eps, router=router)
  return layers.rms_norm(h, p["post_ffw_norm"], eps=cfg.rms_eps)


def block(p: dict, x: jax.Array, attend, ple: jax.Array | None, cfg: ModelConfig, *,
          xn: jax.Array | None = None, tail=None, tail_mlp: bool = False,
          router_kernels: bool = False, attention_end=None):
  """One decoder layer: x [B, T, D] -> x.

  `attend(xn) -> [R, T, N, H]` does the layer's attention (R = B, or more where rows padded for
  the o projection follow the B real ones: `decode_attention`). `xn`: the layer's normed input
  if the previous layer's `tail` computed it (rows padded as its first projection pads, which
  `attend` takes). `tail(p, x, d, ple) -> (x, next xn)`: the end of the layer as
  `ple_kernels.tail` (PLE layers) or `moe_kernels.tail` (MoE layers), from the residual after
  attention, the (shared) MLP's down projection's padded rows and `ple` as given (PLE: every
  layer's inputs); the layer then returns its pair. With a tail and
  `ple_kernels.ATTENTION_END` the step from the o projection to the MLP's input is one kernel
  too (`ple_kernels.attention_end`), or `attention_end(x, a, p, cfg) -> (x, xn, tail's keyword
  arguments)` where given (`moe_kernels.attention_end`: with the router's logits). `tail_mlp`:
  the tail runs the (shared) MLP too, and takes its normed input in place of its down
  projection (`moe_kernels.folds_mlp`). `router_kernels`: see `feed_forward`.
  """
  mlp = (lambda xn: xn) if tail_mlp else functools.partial(layers.mlp, p=p["mlp"],
                                                           padded_rows=True)
  if xn is None:
    xn = layers.rms_norm(x, p["pre_attn_norm"], eps=cfg.rms_eps)
  a = quant.einsum("BTNH,NHD->BTD", attend(xn), p["attn"]["o"])
  if tail is not None and ple_kernels.ATTENTION_END:
    if attention_end is None:
      x, xn = ple_kernels.attention_end(x, a, p, cfg)   # (a's padded rows, xn's as the MLP's)
      return tail(p, x, mlp(xn), ple)
    x, xn, more = attention_end(x, a, p, cfg)
    return tail(p, x, mlp(xn), ple, **more)
  x = x + layers.rms_norm(a[:x.shape[0]], p["post_attn_norm"], eps=cfg.rms_eps)
  if tail is not None:
    return tail(p, x, mlp(layers.rms_norm(x, p["pre_ffw_norm"], eps=cfg.rms_eps)), ple)
  x = x + feed_forward(p, x, cfg, router_kernels=router_kernels)
  if ple is not None:
    g = layers.gelu(quant.einsum("BTD,DP->BTP", x, p["ple"]["gate"])) * ple
    x = x + layers.rms_norm(quant.einsum("BTP,PD->BTD", g, p["ple"]["proj"]),
                            p["ple"]["norm"], eps=cfg.rms_eps)
  return x * p["layer_scalar"].astype(x.dtype)


def lm_head(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Tied head with the final softcap; float32 logits [B, T, V]."""
  logits = quant.einsum("BTD,VD->BTV", hidden, params["embed"].astype(hidden.dtype),
                        preferred_element_type=F32)
  return layers.softcap(logits, cfg.final_logit_softcap)


def run_layers(params: dict, tokens: jax.Array, *, config: ModelConfig,
               cache: KVCache | None = None, start: jax.Array | None = None,
               tree: tree_lib.TreeSpec | None = None):
  """The decoder layers of `forward` (embedding through the last layer; no final norm or head).

  `config` may describe a prefix of the layers of `params` (the self-drafter): only the first
  `config.num_layers` layers run, and with a cache only their K/V are written. `params` may be
  int8-quantized (quant.py): quantized weights stay int8 and are dequantized inside their matmuls.
  `tree`: as in `forward`. On a GPU, a forward through the cache without a tree of up to a few
  positions a row runs the attention as `decode_attention`'s kernels (see
  `decode_attention.choose`), in the PLE models each layer's end and the next layer's norm
  as `ple_kernels`' (see `ple_kernels.choose`), and in the MoE models the router and each
  layer's end as `moe_kernels`' (see `moe_kernels.choose`, `moe_kernels.finishes`).

  Returns:
    (x [B, T, D] residual stream after the last layer, kv_now: per layer the (k, v, kv_idx) it
     attended to, cache with this chunk's K/V written or None).
  """
  cfg = config
  params = quant.cast(params, cfg.dtype)
  b, t = tokens.shape
  if tree is not None and (cache is None or t != tree.num_nodes):
    raise ValueError(f"a tree forward needs a cache and {tree.num_nodes} tokens per row, got "
                     f"{t} tokens{'' if cache is not None else ' and no cache'}")
  if cache is None:
    start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  else:
    start = cache.start
    idx = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)
  # [B, T] sequence index each token stands at (RoPE, masks); a tree node's K/V slot is idx.
  q_idx = idx if tree is None else cache.length[:, None] + jnp.asarray(tree.depth)
  positions = jnp.maximum(q_idx - start[:, None], 0)

  x = embed_tokens(params, tokens, cfg)
  ple = per_layer_inputs(params, tokens, x, cfg) if cfg.per_layer_dim else None

  new_k, new_v = list(cache.k) if cache else [None] * cfg.num_layers, \
      list(cache.v) if cache else [None] * cfg.num_layers
  ring_idx = kvc.write_ring_idx(cache.ring_idx, idx) if cache else None
  # [B, S] sequence index each cache slot holds, by layer kind
  slot_idx = {SLIDING: ring_idx, FULL: cache.slot_indices(True)} if cache else None
  kv_now: list[Any] = [None] * cfg.num_layers   # (k, v, kv_idx) each layer attends to
  kernels = None   # a few positions a row through the cache on a GPU: the attention kernels
  if decode_attention.choose(cfg, b, t, cache is not None, tree):
    kernels = decode_attention.Step(
        cfg, {kind: slot_idx[kind] for kind in set(cfg.layer_types)}, idx, start, positions)
  # through a cache on a GPU, a PLE model: each layer's end (and the next layer's norm) as
  # ple_kernels' kernels
  tails = ple_kernels.choose(cfg, params, b, t, cache is not None, tree)
  # through a cache on a GPU, an MoE model: its router as moe_kernels' kernels
  moe = next((p["moe"] for p in params["layers"][:cfg.num_layers] if "moe" in p), None)
  routes = moe is not None and moe_kernels.choose(cfg, moe, b * t, cache is not None)
  # and each layer's end after its experts (and the next layer's norm) as one kernel more
  finishes = moe_kernels.finishes(cfg, params, b * t, cache is not None)
  # with the shared MLP as more groups of the experts' kernel calls
  folds = moe_kernels.folds_mlp(cfg, params, b * t, cache is not None)
  xn = None   # the layer's normed input, from the previous layer's tail
  for i, p in enumerate(params["layers"][:cfg.num_layers]):
    kind = cfg.layer_types[i]
    window = cfg.sliding_window if kind == SLIDING else None

    def attend(xn, i=i, p=p, kind=kind, window=window):
      if kernels is not None and (cfg.is_kv_shared(i) or "k" not in p["attn"]):
        return attend_kernels(xn, i, p["attn"], kind)
      xn = xn[:b]   # (a tail's padded rows)
      if cfg.is_kv_shared(i):
        q = project_q(p["attn"], xn, positions, cfg, kind)
        k, v, kv_idx = kv_now[cfg.kv_source(i)]
      else:
        if "k" in p["attn"]:
          q = project_q(p["attn"], xn, positions, cfg, kind)
          k, v = project_kv(p["attn"], xn, positions, cfg, kind)
        else:
          q, k, v = project_fused(p["attn"], xn, positions, cfg, kind)
        if cache is None:
          kv_idx = idx
        else:
          new_k[i] = kvc.write(new_k[i], k, idx)
          new_v[i] = kvc.write(new_v[i], v, idx)
          k, v = new_k[i], new_v[i]
          kv_idx = slot_idx[kind]
        kv_now[i] = (k, v, kv_idx)
      if tree is None:
        mask = layers.attention_mask(idx, kv_idx, start, window=window)
      else:
        mask = tree_lib.attention_mask(q_idx, kv_idx, start, window=window,
                                       chunk_start=cache.length, tree=tree)
      return layers.attention(q, k, v, mask)

    def attend_kernels(xn, i, p, kind):
      """`attend` as decode_attention's kernels: [R, T, N, H] (R >= B rows, see `block`)."""
      n, o = cfg.num_heads, p["o"]
      if cfg.is_kv_shared(i):
        k, v, _ = kv_now[cfg.kv_source(i)]
        raw = quant.einsum("BTD,DNH->BTNH", xn, p["q"], padded_rows=True)
        return kernels(raw, p["q_norm"], k, v, kind, o_weight=o)[0]
      with_v = "qkv" in p
      raw = quant.einsum("BTD,DNH->BTNH", xn, p["qkv"] if with_v else p["qk"], padded_rows=True)
      kv = (raw.shape[2] - n) // (2 if with_v else 1)
      out, new_k[i], new_v[i] = kernels(raw, p["q_norm"], new_k[i], new_v[i], kind,
                                        new_at=(n, n + kv if with_v else n), k_norm=p["k_norm"],
                                        o_weight=o)
      kv_now[i] = (new_k[i], new_v[i], slot_idx[kind])
      return out

    if tails:   # (the tail reads the layer's slice of `ple` itself)
      tail = functools.partial(ple_kernels.tail, cfg=cfg, layer=i,
                               **_next_layer(params, i, b * t, cfg))
      x, xn = block(p, x, attend, ple, cfg, xn=xn, tail=tail)
    elif finishes:
      tail = functools.partial(moe_kernels.tail, cfg=cfg, mlp_input=folds,
                               **_next_layer(params, i, b * t, cfg))
      x, xn = block(p, x, attend, None, cfg, xn=xn, tail=tail, tail_mlp=folds,
                    attention_end=moe_kernels.attention_end if moe_kernels.ROUTER_END else None)
    else:
      x = block(p, x, attend, None if ple is None else ple[:, :, i], cfg, router_kernels=routes)

  new_cache = None if cache is None else cache.replace(k=tuple(new_k), v=tuple(new_v),
                                                       ring_idx=ring_idx)
  return x, kv_now, new_cache


def _next_layer(params: dict, i: int, b: int, cfg: ModelConfig) -> dict:
  """`ple_kernels.tail`'s and `moe_kernels.tail`'s arguments for the layer after i: its
  pre-attention norm weight and the rows its first projection takes for b positions (two for
  one where `quant.einsum` would pad it)."""
  if i + 1 >= cfg.num_layers:
    return {}
  p = params["layers"][i + 1]
  attn = p["attn"]
  w = next(attn[k] for k in ("qkv", "qk", "q") if k in attn)
  return {"next_norm": p["pre_attn_norm"], "next_rows": ple_kernels.rows_for(w, b)}


def forward(params: dict, tokens: jax.Array, *, config: ModelConfig,
            cache: KVCache | None = None, start: jax.Array | None = None,
            last_only: bool = False, tree: tree_lib.TreeSpec | None = None) -> ForwardOutput:
  """Runs the decoder on `tokens` [B, T].

  Args:
    params: parameter tree (params.py), float or int8-quantized (quant.py); cast to
      `config.dtype` on use (quantized weights stay int8 and are dequantized inside their matmuls).
    tokens: [B, T] int32 token ids.
    config: the architecture (static).
    cache: None for causal attention within `tokens`; else the chunk follows `cache.length`.
    start: [B] first real index of left-padded rows (no-cache mode only; default 0).
    last_only: compute logits only at the last position (prefill).
    tree: (static) the tokens are the N nodes of this draft tree (cache mode only; see the module
      docstring).
  """
  cfg = config
  params = quant.cast(params, cfg.dtype)   # int8 weights stay int8, their scales float32
  x, kv_now, new_cache = run_layers(params, tokens, config=cfg, cache=cache, start=start,
                                    tree=tree)
  hidden = layers.rms_norm(x, params["final_norm"], eps=cfg.rms_eps)
  logits = lm_head(params, hidden[:, -1:] if last_only else hidden, cfg)
  taps = {kind: Tap(*kv_now[layer]) for kind, layer in cfg.tap_layers.items()}
  if cache is None:
    return ForwardOutput(logits=logits, hidden=hidden, taps=taps, cache=None,
                         kv=tuple(None if e is None else e[:2] for e in kv_now))
  return ForwardOutput(logits=logits, hidden=hidden, taps=taps, cache=new_cache, kv=None)


def prefill(params: dict, tokens: jax.Array, start: jax.Array, *, config: ModelConfig,
            max_len: int, max_chunk: int = 1, last_only: bool = True):
  """Runs a left-padded prompt batch and returns (ForwardOutput, cache with length = T).

  Args:
    tokens: [B, T] prompts, row b left-padded with start[b] pad tokens.
    max_len: full-layer cache slots (prompt + new tokens + speculative slack).
    max_chunk: the longest chunk later forwards will write (sizes the sliding ring).
  """
  b, t = tokens.shape
  out = forward(params, tokens, config=config, start=start, last_only=last_only)
  cache = kvc.init_cache(config, b, max_len, max_chunk=max_chunk, start=start)
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ks = tuple(None if buf is None else kvc.write(buf, kv[0], idx) for buf, kv in zip(cache.k, out.kv))
  vs = tuple(None if buf is None else kvc.write(buf, kv[1], idx) for buf, kv in zip(cache.v, out.kv))
  cache = cache.replace(k=ks, v=vs, ring_idx=kvc.write_ring_idx(cache.ring_idx, idx),
                        length=jnp.full((b,), t, jnp.int32))
  return out.replace(kv=None, cache=cache), cache
