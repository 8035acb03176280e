"""Drafter kinds: three drafter designs behind one protocol, chosen by the config's class.

  kind              config (module)                             drafts
  'assistant'       DrafterConfig (drafter.py)                  Gemma 4 MTP assistant: recurrent,
                                                                Q-only attention on target taps
  'parallel_heads'  ParallelHeadsConfig (heads_drafter.py)      K heads on the target's hidden
                                                                state, all K from one call
  'self'            SelfDrafterConfig (self_drafter.py)         the target's first N layers
                                                                (+ adapter), autoregressive

Each module provides, for its config `cfg` (a frozen dataclass with class attribute `kind` and
fields `dtype`, `param_dtype`):

  for_target(target_config, **kw) -> cfg
  param_specs(cfg), init_params(cfg, key)
  draft(dparams, cfg, tparams, tcfg, state, *, k, sampler, key)
      -> (drafts [B, k] int32, q [B, k, V] float32 or None (greedy), cache)
     q is exactly the distribution each draft was drawn from (the drafter's logits after the
     target's sampling processing), as exact verification requires; `cache` is the target's
     cache, where a drafter may have written K/V at positions >= length (the verify forward
     overwrites them).

and, if the kind drafts static trees (tree.py; today only the assistant, with the 'clean'
convention; `check_trees` says why another cannot):

  draft_tree(dparams, cfg, tparams, tcfg, state, *, tree, sampler, key)
      -> (tokens [B, N] int32 (node 0 = state.last), q [B, N, V] float32 or None (greedy), cache)
     row v of q is the distribution the children of node v were drawn from (without replacement).

Distillation of each kind is in distill.py; checkpoints store the kind (`drafter_kind`).
"""

from __future__ import annotations

from typing import Any

import jax

from gemma_mtp import drafter
from gemma_mtp import heads_drafter
from gemma_mtp import params as params_lib
from gemma_mtp import self_drafter
from gemma_mtp.config import ModelConfig

ASSISTANT = drafter.DrafterConfig.kind
PARALLEL_HEADS = heads_drafter.ParallelHeadsConfig.kind
SELF = self_drafter.SelfDrafterConfig.kind

_MODULES = {ASSISTANT: drafter, PARALLEL_HEADS: heads_drafter, SELF: self_drafter}
CONFIGS = {ASSISTANT: drafter.DrafterConfig, PARALLEL_HEADS: heads_drafter.ParallelHeadsConfig,
           SELF: self_drafter.SelfDrafterConfig}


def module(kind: str):
  """The module implementing `kind` (ValueError naming the known kinds otherwise)."""
  if kind not in _MODULES:
    raise ValueError(f"unknown drafter kind {kind!r}; expected one of {sorted(_MODULES)}")
  return _MODULES[kind]


def config_class(kind: str) -> type:
  module(kind)
  return CONFIGS[kind]


def for_target(target: ModelConfig, *, kind: str = ASSISTANT, **kw):
  """A drafter config of `kind` shaped for `target` (kw: that module's `for_target` arguments)."""
  return module(kind).for_target(target, **kw)


def param_specs(cfg) -> dict[str, Any]:
  return module(cfg.kind).param_specs(cfg)


def init_params(cfg, key: jax.Array):
  return module(cfg.kind).init_params(cfg, key)


def max_draft(cfg) -> int | None:
  """The longest draft `cfg` can make (None: any)."""
  return getattr(cfg, "max_draft", None)


def draft(dparams, dcfg, tparams, tcfg: ModelConfig, state, *, k: int, sampler,
          key: jax.Array):
  """K drafts of one speculative round (see the module docstring)."""
  return module(dcfg.kind).draft(dparams, dcfg, tparams, tcfg, state, k=k, sampler=sampler,
                                  key=key)


def check_trees(cfg) -> None:
  """Raises ValueError unless `cfg` can draft the tree buckets of `speculative.SpecConfig.trees`.

  Only the assistant with the 'clean' convention can: its nodes of one depth are independent
  queries on the same committed K/V. Parallel heads draft every position from the same state
  (no per-candidate continuation), the self-drafter would need a tree-masked pass through its own
  layers, and the assistant's 'hf' convention reads K/V that depend on the previous round's
  chain layout.
  """
  if cfg.kind != ASSISTANT:
    raise ValueError(f"tree buckets need an {ASSISTANT!r} drafter with the "
                     f"{drafter.CLEAN_CONVENTION!r} convention; a {cfg.kind!r} drafter drafts "
                     f"chains only (use draft_lengths)")
  if cfg.convention != drafter.CLEAN_CONVENTION:
    raise ValueError(f"tree buckets need the {ASSISTANT!r} drafter's "
                     f"{drafter.CLEAN_CONVENTION!r} convention, got convention "
                     f"{cfg.convention!r} (load it with convention='clean')")


def draft_tree(dparams, dcfg, tparams, tcfg: ModelConfig, state, *, tree, sampler,
               key: jax.Array):
  """The nodes of one round's draft tree (see the module docstring; `check_trees` first)."""
  check_trees(dcfg)
  return module(dcfg.kind).draft_tree(dparams, dcfg, tparams, tcfg, state, tree=tree,
                                      sampler=sampler, key=key)


def describe(cfg) -> str:
  """One line for logs: kind, parameter count and shape."""
  n = params_lib.count_params(param_specs(cfg)) / 1e6
  if cfg.kind == ASSISTANT:
    head = "centroid" if cfg.num_centroids else "dense"
    return (f"assistant drafter ({n:.2f}M params, {cfg.num_layers} layers, D={cfg.embed_dim}, "
            f"{head} head, {cfg.dtype})")
  if cfg.kind == PARALLEL_HEADS:
    return (f"parallel-heads drafter ({n:.2f}M params, {cfg.num_heads} heads, MLP "
            f"{cfg.mlp_dim}, {cfg.dtype})")
  layers = "int8 copies of the first" if cfg.int8_layers is not None else "first"
  return (f"self-drafter ({layers} {cfg.num_layers} target layers, adapter rank "
          f"{cfg.adapter_rank}: {n:.2f}M params, {cfg.dtype})")
