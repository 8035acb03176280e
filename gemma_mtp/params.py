"""Every weight of the decoder described once: shape, logical axes, initializer, checkpoint name.

`param_specs(config)` returns a pytree of `ParamSpec` with the same structure as the parameters. Init,
abstract shapes (`jax.eval_shape`-free), parameter counts, sharding (via the logical axes) and Hugging Face
import/export are all derived from it, so a weight added here is added everywhere.

Parameter tree (L layers; N query heads, K kv heads, H head dim of the layer; I MLP width):

  embed [V, D]                         tied input embedding and LM head
  final_norm [D]
  ple: {embed [Vp, L, P], proj [D, L, P], norm [P]}                      (PLE models only)
  layers: list of L dicts
    pre_attn_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm [D], layer_scalar [1]
    attn: {q [D, N, H], q_norm [H], o [N, H, D],
           k [D, K, H], k_norm [H], v [D, K, H]}    (k, k_norm, v absent on KV-shared layers;
                                                     v absent on k_eq_v full layers)
    mlp: {gate [D, I], up [D, I], down [I, D]}
    ple: {gate [D, P], proj [P, D], norm [D]}                            (PLE models only)
    moe: {router [D, E], router_scale [D], expert_scale [E], gate_up [E, D, 2X], down [E, X, D],
          pre_norm [D], post_norm [D], dense_post_norm [D]}               (MoE models only)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One weight.

  Attributes:
    shape: our shape.
    axes: one logical axis name per dimension (see `sharding.py`).
    init: 'normal' (std 1/sqrt(fan_in) over `fan_in_axes`), 'ones' or 'zeros'.
    fan_in_axes: dimensions whose product is the fan-in of a 'normal' weight.
    hf_key: Hugging Face tensor name below the text-model prefix (`model.` / `model.language_model.`).
    hf_perm: permutation taking the HF tensor to our axis order before the reshape (None: as is).
    dtype: overrides the config's param dtype (None: use it).
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str = "normal"
  fan_in_axes: tuple[int, ...] = (0,)
  hf_key: str = ""
  hf_perm: tuple[int, ...] | None = None
  dtype: str | None = None

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"{self.hf_key}: shape {self.shape} and axes {self.axes} differ in rank")

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _norm(dim: int, key: str, axis: str = "embed") -> ParamSpec:
  return ParamSpec((dim,), (axis,), init="ones", hf_key=key)


def _linear(shape, axes, key, fan_in_axes=(0,)) -> ParamSpec:
  """A HF nn.Linear [out, in] stored as our [in..., out...] kernel (transpose, then reshape)."""
  return ParamSpec(tuple(shape), tuple(axes), fan_in_axes=fan_in_axes, hf_key=key, hf_perm=(1, 0))


def layer_specs(cfg: ModelConfig, i: int) -> dict[str, Any]:
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
  p = f"layers.{i}."
  a = p + "self_attn."
  attn = {
      "q": _linear((d, n, h), ("embed", "heads", "head_dim"), a + "q_proj.weight"),
      "q_norm": _norm(h, a + "q_norm.weight", "head_dim"),
      "o": _linear((n, h, d), ("heads", "head_dim", "embed"), a + "o_proj.weight",
                   fan_in_axes=(0, 1)),
  }
  if not cfg.is_kv_shared(i):
    attn["k"] = _linear((d, k, h), ("embed", "kv_heads", "head_dim"), a + "k_proj.weight")
    attn["k_norm"] = _norm(h, a + "k_norm.weight", "head_dim")
    if cfg.has_v_proj(i):
      attn["v"] = _linear((d, k, h), ("embed", "kv_heads", "head_dim"), a + "v_proj.weight")
  m = p + "mlp."
  i_dim = cfg.layer_mlp_dim(i)
  spec = {
      "pre_attn_norm": _norm(d, p + "input_layernorm.weight"),
      "post_attn_norm": _norm(d, p + "post_attention_layernorm.weight"),
      "pre_ffw_norm": _norm(d, p + "pre_feedforward_layernorm.weight"),
      "post_ffw_norm": _norm(d, p + "post_feedforward_layernorm.weight"),
      "layer_scalar": ParamSpec((1,), (None,), init="ones", hf_key=p + "layer_scalar"),
      "attn": attn,
      "mlp": {
          "gate": _linear((d, i_dim), ("embed", "mlp"), m + "gate_proj.weight"),
          "up": _linear((d, i_dim), ("embed", "mlp"), m + "up_proj.weight"),
          "down": _linear((i_dim, d), ("mlp", "embed"), m + "down_proj.weight"),
      },
  }
  if cfg.per_layer_dim:
    pd = cfg.per_layer_dim
    spec["ple"] = {
        "gate": _linear((d, pd), ("embed", "per_layer"), p + "per_layer_input_gate.weight"),
        "proj": _linear((pd, d), ("per_layer", "embed"), p + "per_layer_projection.weight"),
        "norm": _norm(d, p + "post_per_layer_input_norm.weight"),
    }
  if cfg.num_experts:
    e, x = cfg.num_experts, cfg.expert_dim
    spec["moe"] = {
        "router": _linear((d, e), ("embed", "experts"), p + "router.proj.weight"),
        "router_scale": _norm(d, p + "router.scale"),
        "expert_scale": ParamSpec((e,), ("experts",), init="ones",
                                  hf_key=p + "router.per_expert_scale"),
        "gate_up": ParamSpec((e, d, 2 * x), ("experts", "embed", "expert_mlp"), fan_in_axes=(1,),
                             hf_key=p + "experts.gate_up_proj", hf_perm=(0, 2, 1)),
        "down": ParamSpec((e, x, d), ("experts", "expert_mlp", "embed"), fan_in_axes=(1,),
                          hf_key=p + "experts.down_proj", hf_perm=(0, 2, 1)),
        "pre_norm": _norm(d, p + "pre_feedforward_layernorm_2.weight"),
        "post_norm": _norm(d, p + "post_feedforward_layernorm_2.weight"),
        "dense_post_norm": _norm(d, p + "post_feedforward_layernorm_1.weight"),
    }
  return spec


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
  """The full parameter description of a decoder (structure documented in the module docstring)."""
  d = cfg.embed_dim
  specs: dict[str, Any] = {
      # std 1/sqrt(D): x sqrt(D) on input gives unit-scale activations, and the tied head on a
      # unit-RMS hidden state gives unit-scale logits.
      "embed": ParamSpec((cfg.vocab_size, d), ("vocab", "embed"), fan_in_axes=(1,),
                         hf_key="embed_tokens.weight"),
      "final_norm": _norm(d, "norm.weight"),
      "layers": [layer_specs(cfg, i) for i in range(cfg.num_layers)],
  }
  if cfg.per_layer_dim:
    nl, pd = cfg.num_layers, cfg.per_layer_dim
    specs["ple"] = {
        "embed": ParamSpec((cfg.per_layer_vocab_size, nl, pd), ("vocab", "layers", "per_layer"),
                           fan_in_axes=(2,), hf_key="embed_tokens_per_layer.weight"),
        "proj": _linear((d, nl, pd), ("embed", "layers", "per_layer"),
                        "per_layer_model_projection.weight"),
        "norm": _norm(pd, "per_layer_projection_norm.weight", "per_layer"),
    }
  return specs


# Per layer part, the weights of the fused inference layout (`model.fuse_projections`).
FUSED_NAMES = {"attn": ("qkv", "qk"), "mlp": ("gate_up",)}


def is_fused(tree: Any) -> bool:
  """Whether a target's parameter tree is in the fused inference layout (`model.fuse_projections`:
  q|k|v and gate|up joined per layer), which checkpoints, sharding and quantization do not take."""
  layers = tree.get("layers", ()) if isinstance(tree, dict) else ()
  return any(isinstance(p, dict) and name in p.get(part, {})
             for p in layers for part, names in FUSED_NAMES.items() for name in names)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def map_specs(fn, specs):
  """tree_map over a spec tree (ParamSpec leaves)."""
  return jax.tree_util.tree_map(fn, specs, is_leaf=is_spec)


def spec_dtype(spec: ParamSpec, cfg) -> jnp.dtype:
  return jnp.dtype(spec.dtype or cfg.param_dtype)


def abstract_params(cfg, specs=None):
  """jax.ShapeDtypeStruct tree of the parameters (no memory)."""
  specs = param_specs(cfg) if specs is None else specs
  return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, spec_dtype(s, cfg)), specs)


def count_params(specs) -> int:
  return sum(s.size for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec))


def init_from_specs(specs, cfg, key: jax.Array):
  """Random parameters: normal(0, 1/sqrt(fan_in)) kernels, ones for norms and scalars."""
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  out = []
  for spec, k in zip(leaves, keys):
    dtype = spec_dtype(spec, cfg)
    if spec.init == "ones":
      out.append(jnp.ones(spec.shape, dtype))
    elif spec.init == "zeros":
      out.append(jnp.zeros(spec.shape, dtype))
    else:
      fan_in = math.prod(spec.shape[a] for a in spec.fan_in_axes)
      w = jax.random.normal(k, spec.shape, jnp.float32) / np.sqrt(fan_in)
      out.append(w.astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_params(cfg: ModelConfig, key: jax.Array):
  """Random decoder parameters (see `init_from_specs`)."""
  return init_from_specs(param_specs(cfg), cfg, key)


def from_hf(spec: ParamSpec, array: np.ndarray) -> np.ndarray:
  """A HF tensor in our layout; raises ValueError naming the tensor when the size is wrong."""
  expected = to_hf_shape(spec)
  if tuple(array.shape) != expected:
    raise ValueError(f"tensor {spec.hf_key!r} has shape {tuple(array.shape)}, expected {expected}")
  arr = np.transpose(array, spec.hf_perm) if spec.hf_perm else array
  return arr.reshape(spec.shape)


def to_hf_shape(spec: ParamSpec) -> tuple[int, ...]:
  """The shape of the HF tensor for `spec`."""
  if spec.hf_perm is None:
    if spec.hf_key.endswith("embed_tokens_per_layer.weight"):
      return (spec.shape[0], spec.shape[1] * spec.shape[2])
    return spec.shape
  if spec.hf_perm == (1, 0):  # nn.Linear: our [in..., out...] -> HF [out, in]
    n_in = math.prod(spec.shape[a] for a in spec.fan_in_axes)
    return (spec.size // n_in, n_in)
  return tuple(spec.shape[a] for a in np.argsort(spec.hf_perm))


def to_hf(spec: ParamSpec, array: np.ndarray) -> np.ndarray:
  """Our array in the HF layout (inverse of `from_hf`)."""
  shape = to_hf_shape(spec)
  if spec.hf_perm is None:
    return np.asarray(array).reshape(shape)
  permuted = tuple(shape[a] for a in spec.hf_perm)
  return np.transpose(np.asarray(array).reshape(permuted), np.argsort(spec.hf_perm))
