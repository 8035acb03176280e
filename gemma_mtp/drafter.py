"""The Gemma 4 MTP drafter ("assistant"): Q-only attention on the target's K/V taps.

One drafter step (`step`) maps (last token, carried hidden state) to (logits, next hidden state):

  e = E_target[tok] * bf16(sqrt(Dt))               the TARGET's embedding and scale
  z = [e, h_in] @ pre_proj                         [B, 2 Dt] -> [B, Da]
  z = 4 Gemma 4 blocks whose attention has queries only, reading the target's tap K/V
  z = RMSNorm(z);  h_out = z @ post_proj;  logits = head(z)   (no softcap)

A speculative round drafts a chain (`draft`: K recurrent steps) or, with the 'clean' convention, a
static tree (`draft_tree`: one batched call per depth, several candidates per node; tree.py).

The head is the tied dense head, or the centroid ("ordered embedding") head of the E2B/E4B drafters:
top-k centroids -> their clusters of `token_ordering` -> candidate ids -> sparse logits, every other
entry filled with (min of the candidate logits over the batch) - 1 as in the reference.

Parameter tree:
  pre_proj [2 Dt, Da], post_proj [Da, Dt], embed [V, Da] (tied head), final_norm [Da],
  layers: list of {pre_attn_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm [Da], layer_scalar [1],
                   attn: {q [Da, N, H], q_norm [H], o [N, H, Da]}, mlp: {gate, up, down}}
  centroids [C, Da], token_ordering [V] int32                        (centroid head only)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import drafter_kernels
from gemma_mtp import layers
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import sampling
from gemma_mtp import tree as tree_lib
from gemma_mtp.config import FULL, SLIDING, ModelConfig, pattern

F32 = jnp.float32
HF_CONVENTION = "hf"
CLEAN_CONVENTION = "clean"


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """An MTP drafter. Head dims and KV-head counts must equal the target's (it reads its K/V).

  Attributes:
    target_embed_dim: Dt, the target's width (`backbone_hidden_size`).
    embed_dim: Da, the drafter's own width.
    vocab_size: V (the target's).
    layer_types: SLIDING / FULL per drafter layer (which tap each layer reads).
    num_heads: query heads.
    num_kv_heads, num_global_kv_heads, head_dim, global_head_dim: of the target's tap layers.
    mlp_dim: GeGLU width.
    sliding_window: W of the sliding tap.
    num_centroids: C of the centroid head; 0 selects the dense tied head.
    centroid_top_k: centroids kept per step (candidates = top_k * V / C).
    convention: which target K/V a step sees and its query position (see `tap_masks`):
      'hf' reproduces `transformers` assisted generation exactly; 'clean' sees committed
      positions only (sliding: the last W) with the query at the carried hidden state's position.
    rope_theta, global_rope_theta, global_rotary_fraction, rms_eps, dtype, param_dtype: as the target.
  """

  kind: ClassVar[str] = "assistant"  # see drafter_kinds.py
  target_embed_dim: int
  embed_dim: int
  vocab_size: int
  layer_types: tuple[str, ...]
  num_heads: int
  num_kv_heads: int
  num_global_kv_heads: int
  mlp_dim: int
  sliding_window: int
  head_dim: int = 256
  global_head_dim: int = 512
  num_centroids: int = 0
  centroid_top_k: int = 32
  convention: str = HF_CONVENTION
  rope_theta: float = 10_000.0
  global_rope_theta: float = 1_000_000.0
  global_rotary_fraction: float = 0.25
  rms_eps: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.convention not in (HF_CONVENTION, CLEAN_CONVENTION):
      raise ValueError(f"convention must be {HF_CONVENTION!r} or {CLEAN_CONVENTION!r}, "
                       f"got {self.convention!r}")
    if self.num_centroids and self.vocab_size % self.num_centroids:
      raise ValueError(f"vocab_size={self.vocab_size} is not a multiple of "
                       f"num_centroids={self.num_centroids}")
    if self.num_centroids and not 0 < self.centroid_top_k <= self.num_centroids:
      raise ValueError(f"centroid_top_k={self.centroid_top_k} must be in "
                       f"[1, num_centroids={self.num_centroids}]")

  @property
  def num_layers(self) -> int:
    return len(self.layer_types)

  def replace(self, **kw) -> "DrafterConfig":
    return dataclasses.replace(self, **kw)

  def as_decoder(self) -> ModelConfig:
    """The drafter's blocks described as a decoder config (for the shared block specs)."""
    return ModelConfig(
        vocab_size=self.vocab_size, embed_dim=self.embed_dim, layer_types=self.layer_types,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        num_global_kv_heads=self.num_global_kv_heads, mlp_dim=self.mlp_dim,
        sliding_window=self.sliding_window, head_dim=self.head_dim,
        global_head_dim=self.global_head_dim, rope_theta=self.rope_theta,
        global_rope_theta=self.global_rope_theta,
        global_rotary_fraction=self.global_rotary_fraction, rms_eps=self.rms_eps,
        dtype=self.dtype, param_dtype=self.param_dtype)


def for_target(target: ModelConfig, *, embed_dim: int, num_heads: int, mlp_dim: int,
               num_layers: int = 4, **kw) -> DrafterConfig:
  """A drafter shaped to read `target`'s taps (layers S, ..., S, F)."""
  return DrafterConfig(
      target_embed_dim=target.embed_dim, embed_dim=embed_dim, vocab_size=target.vocab_size,
      layer_types=pattern(num_layers, num_layers), num_heads=num_heads,
      num_kv_heads=target.num_kv_heads, num_global_kv_heads=target.num_global_kv_heads,
      mlp_dim=mlp_dim, sliding_window=target.sliding_window, head_dim=target.head_dim,
      global_head_dim=target.global_head_dim, rope_theta=target.rope_theta,
      global_rope_theta=target.global_rope_theta,
      global_rotary_fraction=target.global_rotary_fraction, rms_eps=target.rms_eps,
      dtype=target.dtype, param_dtype=target.param_dtype, **kw)


# ---- presets of the released drafters (spec section 3.1) ------------------------------------------

def gemma4_e2b_assistant() -> DrafterConfig:
  from gemma_mtp import config as c  # pylint: disable=g-import-not-at-top
  return for_target(c.gemma4_e2b(), embed_dim=256, num_heads=4, mlp_dim=2048,
                    num_centroids=2048, centroid_top_k=32)


def gemma4_e4b_assistant() -> DrafterConfig:
  from gemma_mtp import config as c  # pylint: disable=g-import-not-at-top
  return for_target(c.gemma4_e4b(), embed_dim=256, num_heads=4, mlp_dim=2048,
                    num_centroids=2048, centroid_top_k=32)


def gemma4_31b_assistant() -> DrafterConfig:
  from gemma_mtp import config as c  # pylint: disable=g-import-not-at-top
  return for_target(c.gemma4_31b(), embed_dim=1024, num_heads=32, mlp_dim=8192)


def gemma4_26b_a4b_assistant() -> DrafterConfig:
  """Partly UNVERIFIED in the spec (heads 16, MLP 8192 assumed)."""
  from gemma_mtp import config as c  # pylint: disable=g-import-not-at-top
  return for_target(c.gemma4_26b_a4b(), embed_dim=1024, num_heads=16, mlp_dim=8192)


DRAFTER_PRESETS = {
    "gemma4_e2b_assistant": gemma4_e2b_assistant,
    "gemma4_e4b_assistant": gemma4_e4b_assistant,
    "gemma4_31b_assistant": gemma4_31b_assistant,
    "gemma4_26b_a4b_assistant": gemma4_26b_a4b_assistant,
}


# ---- parameters --------------------------------------------------------------------------------

def param_specs(cfg: DrafterConfig) -> dict[str, Any]:
  """Drafter weights (structure in the module docstring); HF keys are full tensor names."""
  dec = cfg.as_decoder()
  blocks = []
  for i in range(cfg.num_layers):
    spec = params_lib.layer_specs(dec, i)
    spec["attn"] = {k: v for k, v in spec["attn"].items() if k in ("q", "q_norm", "o")}
    blocks.append(params_lib.map_specs(
        lambda s: dataclasses.replace(s, hf_key="model." + s.hf_key), spec))
  da, dt = cfg.embed_dim, cfg.target_embed_dim
  specs: dict[str, Any] = {
      "pre_proj": params_lib.ParamSpec((2 * dt, da), ("embed2", "draft_embed"),
                                       hf_key="pre_projection.weight", hf_perm=(1, 0)),
      "post_proj": params_lib.ParamSpec((da, dt), ("draft_embed", "embed"),
                                        hf_key="post_projection.weight", hf_perm=(1, 0)),
      "embed": params_lib.ParamSpec((cfg.vocab_size, da), ("vocab", "draft_embed"),
                                    fan_in_axes=(1,), hf_key="model.embed_tokens.weight"),
      "final_norm": params_lib.ParamSpec((da,), ("draft_embed",), init="ones",
                                         hf_key="model.norm.weight"),
      "layers": blocks,
  }
  if cfg.num_centroids:
    specs["centroids"] = params_lib.ParamSpec(
        (cfg.num_centroids, da), ("centroids", "draft_embed"), fan_in_axes=(1,),
        hf_key="masked_embedding.centroids.weight")
    specs["token_ordering"] = params_lib.ParamSpec(
        (cfg.vocab_size,), ("vocab",), init="zeros", hf_key="masked_embedding.token_ordering",
        dtype="int32")
  return specs


def init_params(cfg: DrafterConfig, key: jax.Array):
  """Random drafter parameters; the centroid head gets a random token ordering."""
  k_init, k_perm = jax.random.split(key)
  p = params_lib.init_from_specs(param_specs(cfg), cfg, k_init)
  if cfg.num_centroids:
    p["token_ordering"] = jax.random.permutation(k_perm, cfg.vocab_size).astype(jnp.int32)
  return p


# ---- which target K/V a step sees --------------------------------------------------------------

def tap_masks(taps: dict, *, convention: str, window: int, start: jax.Array, last_idx: jax.Array,
              call_start: jax.Array, call_end: jax.Array) -> tuple[dict, jax.Array]:
  """Visibility of the target's tap slots for the steps of one round, and the query position.

  Indices are sequence indices (row b's position = index - start[b]). The round's first input
  token sits at `last_idx` (it has no K/V yet); the carried hidden state is the target's at
  `last_idx - 1`. The previous target call processed indices call_start..call_end.

  'hf' (exactly what `transformers` does; see experiments/hf_assisted_reference.md):
    full: every slot up to min(call_end, last_idx) (after a rejection that includes the K/V of the
      rejected draft at last_idx);
    sliding: the call's buffer begins at b = max(start, call_start - W + 1) (prefill: start), is
      cut to its first (last_idx - start + 1) entries, and the last W + 1 entries of that are seen
      (they may include rejected drafts);
    query position: last_idx - start.
  'clean': committed slots only, start <= idx <= last_idx - 1 (sliding: the last W of them), query
    position last_idx - 1 - start (the hidden state's own position).

  Args:
    taps: {'sliding' | 'full': model.Tap} with idx [B, S].
    start, last_idx, call_start, call_end: [B] int32.
  Returns:
    ({kind: [B, S] bool}, query positions [B] int32).
  """
  masks = {}
  for kind, tap in taps.items():
    idx = tap.idx
    if convention == HF_CONVENTION:
      if kind == FULL:
        hi = jnp.minimum(call_end, last_idx)
        lo = start
      else:
        b = jnp.maximum(start, call_start - window + 1)
        hi = jnp.minimum(call_end, b + last_idx - start)
        lo = jnp.maximum(b, hi - window)
    else:
      hi = last_idx - 1
      lo = start if kind == FULL else jnp.maximum(start, hi - window + 1)
    masks[kind] = (idx >= lo[:, None]) & (idx <= hi[:, None]) & (idx >= 0)
  query = last_idx - start - (0 if convention == HF_CONVENTION else 1)
  return masks, query


# ---- one step ------------------------------------------------------------------------------------

def _candidates(params: dict, z: jax.Array, cfg: DrafterConfig) -> tuple[jax.Array, jax.Array]:
  """The centroid head's candidates: (token ids [B, N], their float32 logits [B, N]), N =
  centroid_top_k * V / C (the clusters of the top-k centroids)."""
  b = z.shape[0]
  per_cluster = cfg.vocab_size // cfg.num_centroids
  c = quant.einsum("BD,CD->BC", z, params["centroids"], preferred_element_type=F32)
  # XLA sorts for this top-k on the GPU (15 us of the E2B assistant's step, NOTES run AQ); top-k
  # through 128-wide chunks, or in two passes of XLA's GPU TopK kernel, did not pay (runs AT, AU).
  _, top = jax.lax.top_k(c, cfg.centroid_top_k)                          # [B, k]
  clusters = params["token_ordering"].reshape(cfg.num_centroids, per_cluster)
  ids = clusters[top].reshape(b, -1)                                     # [B, k * V / C]
  sel = jnp.einsum("BD,BND->BN", z, params["embed"][ids], preferred_element_type=F32)
  return ids, sel


def head(params: dict, z: jax.Array, cfg: DrafterConfig) -> jax.Array:
  """Float32 logits [B, V] from the final-normed drafter state z [B, Da]."""
  if not cfg.num_centroids:
    return quant.einsum("BD,VD->BV", z, params["embed"], preferred_element_type=F32)
  ids, sel = _candidates(params, z, cfg)
  fill = jnp.min(sel) - 1.0                        # the reference fills with the batch-wide min - 1
  rows = jnp.arange(z.shape[0])[:, None]
  return jnp.full((z.shape[0], cfg.vocab_size), fill, F32).at[rows, ids].set(sel)


# Greedy drafting with the centroid head takes the argmax over its candidates (`head_argmax`)
# instead of building and reducing the full [B, V] row (a fill, a scatter and a 262k-wide argmax
# a step for the released assistants: 4-6 us of the E2B assistant's step, runs AR and AT).
# False: the argmax of `head`'s row, as before. Same tokens either way (tested).
GREEDY_CANDIDATES = True


def head_argmax(params: dict, z: jax.Array, cfg: DrafterConfig) -> jax.Array:
  """`sampling.greedy(head(params, z, cfg))`, the greedy draft token [B] int32: with the centroid
  head (and `GREEDY_CANDIDATES`) the first token id among the candidates of the largest logit,
  without the full row. The same token wherever the row's fill (the batch's smallest candidate
  logit - 1) is below that logit, i.e. unless logits reach 2^24 in magnitude."""
  if not (cfg.num_centroids and GREEDY_CANDIDATES):
    return sampling.greedy(head(params, z, cfg))
  ids, sel = _candidates(params, z, cfg)
  first = jnp.argmax(sel, axis=1)
  best = jnp.take_along_axis(sel, first[:, None], axis=1)
  lowest = jnp.min(jnp.where(sel == best, ids, cfg.vocab_size), axis=1)  # ties: the lowest id
  # A NaN logit matches nothing: its candidate then, never an id past the vocabulary.
  return jnp.where(lowest < cfg.vocab_size, lowest,
                   jnp.take_along_axis(ids, first[:, None], axis=1)[:, 0]).astype(jnp.int32)


def step_seq(params: dict, cfg: DrafterConfig, *, target_params: dict,
             target_config: ModelConfig, tokens: jax.Array, hidden: jax.Array,
             query_pos: jax.Array, taps: dict, masks: dict,
             head_fn=head) -> tuple[jax.Array, jax.Array]:
  """T independent drafter steps per row (T queries, e.g. every position of a training sequence).

  Query t of row b reads the tap slots `masks[kind][b, t]`; queries do not see each other.

  Args:
    tokens: [B, T] int32 input tokens; hidden: [B, T, Dt] carried states.
    query_pos: [B, T] RoPE positions of the queries.
    taps: {'sliding' | 'full': model.Tap} with k, v [B, S, K, H]; masks: {kind: [B, T, S] bool}.
    head_fn: `head`, or `head_argmax` for greedy tokens instead of logits.
  Returns:
    (logits [B, T, V] float32 (or tokens [B, T] int32: `head_argmax`), next hidden [B, T, Dt]).
  """
  dtype = jnp.dtype(cfg.dtype)
  params = quant.cast(params, dtype)
  e = model_lib.embed_tokens(target_params, tokens, target_config).astype(dtype)
  u = jnp.concatenate([e, hidden.astype(dtype)], axis=-1)              # [B, T, 2 Dt]
  z = quant.einsum("BTE,ED->BTD", u, params["pre_proj"])
  for i, p in enumerate(params["layers"]):
    kind = cfg.layer_types[i]
    tap, visible = taps[kind], masks[kind]

    def attend(xn, p=p, kind=kind, tap=tap, visible=visible):
      q = model_lib.project_q(p["attn"], xn, query_pos, cfg, kind)
      return layers.attention(q, tap.k.astype(dtype), tap.v.astype(dtype), visible)

    z = model_lib.block(p, z, attend, None, cfg)
  z = layers.rms_norm(z, params["final_norm"], eps=cfg.rms_eps)        # [B, T, Da]
  h_out = quant.einsum("BTD,DE->BTE", z, params["post_proj"])
  b, t = tokens.shape
  out = head_fn(params, z.reshape(b * t, -1), cfg)
  return out.reshape(b, t, *out.shape[1:]), h_out


def step(params: dict, cfg: DrafterConfig, *, target_params: dict, target_config: ModelConfig,
         token: jax.Array, hidden: jax.Array, query_pos: jax.Array, taps: dict,
         masks: dict, head_fn=head) -> tuple[jax.Array, jax.Array]:
  """One drafter step for one query per row (the speculative loop).

  Args:
    token: [B] int32 input token; hidden: [B, Dt] carried state (target final-normed hidden state
      on the first step of a round, the previous step's output after that).
    query_pos: [B] RoPE position of the queries.
    taps: {'sliding' | 'full': model.Tap}; masks: {kind: [B, S] bool} from `tap_masks`.
    head_fn: as `step_seq`'s.
  Returns:
    (logits [B, V] float32 (or tokens [B] int32), next hidden [B, Dt]).
  """
  logits, h = step_seq(params, cfg, target_params=target_params, target_config=target_config,
                       tokens=token[:, None], hidden=hidden[:, None], query_pos=query_pos[:, None],
                       taps=taps, masks={k: m[:, None, :] for k, m in masks.items()},
                       head_fn=head_fn)
  return logits[:, 0], h[:, 0]


# ---- one speculative round's drafts -------------------------------------------------------------

def round_taps(dcfg: DrafterConfig, tcfg: ModelConfig, state) -> tuple[dict, dict, jax.Array]:
  """The target's tap K/V read from `state.cache` for one round, their visibility and the query
  position (`tap_masks`).

  Returns:
    (taps {kind: model.Tap}, masks {kind: [B, S] bool}, query positions [B] int32).
  """
  cache = state.cache
  taps = {kind: model_lib.Tap(k=cache.k[layer], v=cache.v[layer],
                              idx=cache.slot_indices(tcfg.is_full(layer)))
          for kind, layer in tcfg.tap_layers.items()}
  masks, query = tap_masks(
      taps, convention=dcfg.convention, window=tcfg.sliding_window, start=cache.start,
      last_idx=cache.length, call_start=state.call_start, call_end=state.call_end)
  return taps, masks, query


def round_step(dparams, dcfg: DrafterConfig, tparams, tcfg: ModelConfig, taps: dict,
               masks: dict, query_pos: jax.Array, *, greedy: bool = False):
  """The drafter step of one round, `(token [B], hidden [B, Dt]) -> (logits, next hidden)` as
  `step` on these taps (greedy: `(greedy token [B] int32, next hidden)`, through `head_argmax`):
  the Pallas kernels of `drafter_kernels` where `drafter_kernels.choose` takes the drafter (one
  GPU), else `step` itself. `draft` and `bench.drafter_loop` (the measured draft cost of the
  adaptive rule) both step through it, so they time the same step."""
  head_fn = head_argmax if greedy else head
  if drafter_kernels.choose(dparams, dcfg, tparams, tcfg):
    stepper = drafter_kernels.Stepper(dparams, dcfg, tparams, tcfg, taps, masks, query_pos,
                                      head=head_fn)
    if not (greedy and not dcfg.num_centroids):
      return stepper

    def dense_greedy(token, hidden):            # the dense head's logits come from a kernel
      logits, h = stepper(token, hidden)
      return sampling.greedy(logits), h
    return dense_greedy
  return lambda token, hidden: step(dparams, dcfg, target_params=tparams, target_config=tcfg,
                                    token=token, hidden=hidden, query_pos=query_pos, taps=taps,
                                    masks=masks, head_fn=head_fn)


def draft(dparams, dcfg: DrafterConfig, tparams, tcfg: ModelConfig, state, *, k: int,
          sampler: sampling.SamplingParams, key: jax.Array):
  """K recurrent drafter steps from (state.last, state.hidden) on the target's cached taps.

  On a GPU the steps run as Pallas kernels (`drafter_kernels`) where they take the drafter
  (`round_step`).

  Args:
    state: `speculative.SpecState` (cache, last, hidden, call_start, call_end are read).
  Returns:
    (drafts [B, K] int32, q [B, K, V] drafter probabilities or None (greedy), state.cache).
  """
  cache = state.cache
  taps, masks, query = round_taps(dcfg, tcfg, state)
  step_fn = round_step(dparams, dcfg, tparams, tcfg, taps, masks, query,
                       greedy=sampler.is_greedy)

  def one(carry, step_key):
    tok, h = carry
    out, h = step_fn(tok, h)
    nxt, q = (out, None) if sampler.is_greedy else sampling.draw(step_key, out, sampler)
    return (nxt, h), (nxt, q)

  _, (drafts, q) = jax.lax.scan(one, (state.last, state.hidden), jax.random.split(key, k))
  return drafts.T, (None if q is None else jnp.swapaxes(q, 0, 1)), cache


def draft_tree(dparams, dcfg: DrafterConfig, tparams, tcfg: ModelConfig, state, *,
               tree: tree_lib.TreeSpec, sampler: sampling.SamplingParams, key: jax.Array):
  """The nodes of a static draft tree, one batched drafter call per depth ('clean' convention).

  The drafter has no cache of its own: with the 'clean' convention every step of a round sees the
  same committed tap K/V at the same query position, so the f nodes of one depth are f
  independent queries (`step_seq` with T = f), and a node's children continue from its step's
  output state, as the next step of a chain would. Children are the top-k of the node's logits
  (greedy sampler) or k tokens drawn without replacement from its processed distribution q
  (Gumbel top-k), k = the node's number of children (`tree.draw_children`).

  Args:
    state: `speculative.SpecState` (cache, last, hidden are read).
  Returns:
    (tokens [B, N] int32 (node 0 = state.last), q [B, N, V] float32 (row v: the distribution the
     children of v were drawn from; zeros for leaves) or None (greedy), state.cache).
  """
  if dcfg.convention != CLEAN_CONVENTION:
    raise ValueError(f"draft trees need the assistant drafter's {CLEAN_CONVENTION!r} convention "
                     f"(every node of a depth sees the same committed K/V), got "
                     f"{dcfg.convention!r}")
  taps, masks, query = round_taps(dcfg, tcfg, state)
  b, n = state.last.shape[0], tree.num_nodes
  tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(state.last)
  q_all = None
  hidden = state.hidden[:, None]                                          # [B, 1, Dt]
  keys = jax.random.split(key, tree.max_depth)
  for d, (lo, hi) in enumerate(tree.levels[:-1]):
    f = hi - lo                                                           # nodes at depth d
    logits, h_out = step_seq(
        dparams, dcfg, target_params=tparams, target_config=tcfg, tokens=tokens[:, lo:hi],
        hidden=hidden, query_pos=jnp.broadcast_to(query[:, None], (b, f)), taps=taps,
        masks={kind: jnp.broadcast_to(m[:, None, :], (b, f, m.shape[-1]))
               for kind, m in masks.items()})                            # [B, f, V], [B, f, Dt]
    kids = tree.children[lo:hi]                                           # [f, Bmax] static
    width = int((kids >= 0).sum(axis=1).max())
    cand, q = tree_lib.draw_children(keys[d], logits, k=width, sampler=sampler)  # [B, f, width]
    # Static scatter of each node's candidates into its children's slots (fewer children than
    # `width`: its lowest-ranked candidates are dropped).
    src = [(i, r) for i in range(f) for r in range(width) if kids[i, r] >= 0]
    dst = np.array([kids[i, r] for i, r in src])
    tokens = tokens.at[:, dst].set(cand[:, np.array([i for i, _ in src]),
                                        np.array([r for _, r in src])])
    if q is not None:
      q_all = jnp.zeros((b, n, q.shape[-1]), F32) if q_all is None else q_all
      q_all = q_all.at[:, lo:hi].set(q)
    nlo, nhi = tree.levels[d + 1]
    hidden = h_out[:, np.array([tree.parents[c] - lo for c in range(nlo, nhi)])]  # [B, f', Dt]
  return tokens, q_all, state.cache


__all__ = ["DrafterConfig", "SLIDING", "FULL", "step", "step_seq", "tap_masks", "param_specs",
           "init_params", "round_taps", "round_step", "draft", "draft_tree"]
