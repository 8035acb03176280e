"""Architecture configuration of Gemma 4 text decoders, with the published presets.

`ModelConfig` is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`. Every
per-layer property (attention type, head sizes, KV sharing, MLP width) is derived from it here, in one
place, and read by the model, the parameter description and the checkpoint importers.
"""

from __future__ import annotations

import dataclasses
import math

SLIDING = "sliding"
FULL = "full"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Gemma 4 text decoder.

  Attributes:
    vocab_size: V, size of the token embedding and of the tied LM head.
    embed_dim: D, width of the residual stream (`hidden_size`).
    layer_types: one of `SLIDING` / `FULL` per layer; the length is the number of layers L.
    num_heads: query heads on every layer.
    num_kv_heads: key/value heads on sliding layers.
    num_global_kv_heads: key/value heads on full layers.
    head_dim: head width on sliding layers (256 in the releases).
    global_head_dim: head width on full layers (512 in the releases).
    k_eq_v: full layers have no value projection; values are the raw key projection.
    sliding_window: W, a sliding layer at position p sees keys at positions (p - W, p].
    mlp_dim: GeGLU hidden width (dense FFN, or the shared dense MLP of MoE layers).
    double_wide_mlp: KV-shared layers use a 2 * mlp_dim FFN (E2B).
    num_kv_shared_layers: the last layers reuse the K/V of the last earlier layer of their type.
    per_layer_dim: P, width of the per-layer embeddings (PLE); 0 disables them.
    per_layer_vocab_size: rows of the PLE table.
    num_experts: experts of the MoE block (0: no MoE).
    num_experts_per_token: top-k routing.
    expert_dim: hidden width of one expert.
    rope_theta: RoPE base of sliding layers (full rotation).
    global_rope_theta: RoPE base of full layers (proportional RoPE).
    global_rotary_fraction: fraction of a full-layer head that rotates.
    final_logit_softcap: logits = c * tanh(logits / c); None disables it.
    rms_eps: epsilon of every RMSNorm.
    max_seq_len: longest supported context (`max_position_embeddings`).
    dtype: compute (activation) dtype, 'bfloat16' or 'float32'.
    param_dtype: dtype the parameters are stored in.
  """

  vocab_size: int
  embed_dim: int
  layer_types: tuple[str, ...]
  num_heads: int
  num_kv_heads: int
  num_global_kv_heads: int
  mlp_dim: int
  sliding_window: int
  head_dim: int = 256
  global_head_dim: int = 512
  k_eq_v: bool = False
  double_wide_mlp: bool = False
  num_kv_shared_layers: int = 0
  per_layer_dim: int = 0
  per_layer_vocab_size: int = 0
  num_experts: int = 0
  num_experts_per_token: int = 0
  expert_dim: int = 0
  rope_theta: float = 10_000.0
  global_rope_theta: float = 1_000_000.0
  global_rotary_fraction: float = 0.25
  final_logit_softcap: float | None = 30.0
  rms_eps: float = 1e-6
  max_seq_len: int = 131_072
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"

  def __post_init__(self):
    bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
    if bad:
      raise ValueError(f"layer_types may hold only {SLIDING!r} and {FULL!r}, got {bad[0]!r}")
    if not 0 <= self.num_kv_shared_layers < self.num_layers:
      raise ValueError(
          f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, {self.num_layers})")
    for kind in (SLIDING, FULL):
      if kind in self.layer_types and kind not in self.layer_types[:self.first_shared_layer]:
        raise ValueError(f"KV-shared {kind} layers need a non-shared {kind} layer before them")
    for n in (self.num_kv_heads, self.num_global_kv_heads):
      if self.num_heads % n:
        raise ValueError(f"num_heads={self.num_heads} is not a multiple of kv heads {n}")
    if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
      raise ValueError(f"num_experts_per_token={self.num_experts_per_token} must be in "
                       f"[1, num_experts={self.num_experts}]")
    if self.dtype not in ("bfloat16", "float32") or self.param_dtype not in ("bfloat16", "float32"):
      raise ValueError(f"dtype and param_dtype must be 'bfloat16' or 'float32', got "
                       f"{self.dtype!r}, {self.param_dtype!r}")

  # ---- derived per-layer properties ----------------------------------------------------------

  @property
  def num_layers(self) -> int:
    return len(self.layer_types)

  @property
  def first_shared_layer(self) -> int:
    """Index of the first KV-shared layer (= num_layers when nothing is shared)."""
    return self.num_layers - self.num_kv_shared_layers

  def is_full(self, layer: int) -> bool:
    return self.layer_types[layer] == FULL

  def layer_head_dim(self, layer: int) -> int:
    return self.global_head_dim if self.is_full(layer) else self.head_dim

  def layer_kv_heads(self, layer: int) -> int:
    return self.num_global_kv_heads if self.is_full(layer) else self.num_kv_heads

  def has_v_proj(self, layer: int) -> bool:
    return not (self.k_eq_v and self.is_full(layer))

  def is_kv_shared(self, layer: int) -> bool:
    return layer >= self.first_shared_layer

  def last_layer_of_type(self, kind: str) -> int:
    """Last non-shared layer of `kind`: producer for shared layers and drafter tap."""
    return max(i for i in range(self.first_shared_layer) if self.layer_types[i] == kind)

  def kv_source(self, layer: int) -> int:
    """Layer whose K/V `layer` attends to (itself unless KV-shared)."""
    if self.is_kv_shared(layer):
      return self.last_layer_of_type(self.layer_types[layer])
    return layer

  @property
  def tap_layers(self) -> dict[str, int]:
    """The layers whose K/V the MTP drafter reads, by attention type."""
    return {kind: self.last_layer_of_type(kind) for kind in (SLIDING, FULL)
            if kind in self.layer_types}

  def layer_mlp_dim(self, layer: int) -> int:
    return self.mlp_dim * (2 if self.double_wide_mlp and self.is_kv_shared(layer) else 1)

  def rope_theta_of(self, layer: int) -> float:
    return self.global_rope_theta if self.is_full(layer) else self.rope_theta

  def rotary_fraction_of(self, layer: int) -> float:
    return self.global_rotary_fraction if self.is_full(layer) else 1.0

  @property
  def embed_scale(self) -> float:
    """sqrt(D); the model rounds it to the parameter dtype (bf16: E2B 39.25) as the reference does."""
    return math.sqrt(self.embed_dim)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def pattern(num_layers: int, period: int) -> tuple[str, ...]:
  """Layers (sliding x (period - 1), full) repeated; the last layer is always full."""
  types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]
  types[-1] = FULL
  return tuple(types)


# ---- published presets (spec sections 1.1 and 7) ------------------------------------------------

def gemma4_e2b() -> ModelConfig:
  return ModelConfig(
      vocab_size=262_144, embed_dim=1536, layer_types=pattern(35, 5), num_heads=8,
      num_kv_heads=1, num_global_kv_heads=1, mlp_dim=6144, double_wide_mlp=True,
      sliding_window=512, num_kv_shared_layers=20, per_layer_dim=256,
      per_layer_vocab_size=262_144)


def gemma4_e4b() -> ModelConfig:
  return ModelConfig(
      vocab_size=262_144, embed_dim=2560, layer_types=pattern(42, 6), num_heads=8,
      num_kv_heads=2, num_global_kv_heads=2, mlp_dim=10240, sliding_window=512,
      num_kv_shared_layers=18, per_layer_dim=256, per_layer_vocab_size=262_144)


def gemma4_31b() -> ModelConfig:
  return ModelConfig(
      vocab_size=262_144, embed_dim=5376, layer_types=pattern(60, 6), num_heads=32,
      num_kv_heads=16, num_global_kv_heads=4, k_eq_v=True, mlp_dim=21504,
      sliding_window=1024)


def gemma4_26b_a4b() -> ModelConfig:
  return ModelConfig(
      vocab_size=262_144, embed_dim=2816, layer_types=pattern(30, 6), num_heads=16,
      num_kv_heads=8, num_global_kv_heads=2, k_eq_v=True, mlp_dim=2112, sliding_window=1024,
      num_experts=128, num_experts_per_token=8, expert_dim=704)


def tiny(**overrides) -> ModelConfig:
  """A small float32 model with every feature a test may want to switch on."""
  base = dict(
      vocab_size=256, embed_dim=64, layer_types=pattern(6, 3), num_heads=4, num_kv_heads=2,
      num_global_kv_heads=1, head_dim=16, global_head_dim=32, mlp_dim=128, sliding_window=8,
      max_seq_len=1024, dtype="float32", param_dtype="float32")
  base.update(overrides)
  return ModelConfig(**base)


def small() -> ModelConfig:
  """~30M-parameter model for CPU demos and quick GPU training (32k vocabulary)."""
  return ModelConfig(
      vocab_size=32_768, embed_dim=512, layer_types=pattern(8, 4), num_heads=8, num_kv_heads=2,
      num_global_kv_heads=1, head_dim=64, global_head_dim=128, mlp_dim=2048, sliding_window=256,
      max_seq_len=8192)


PRESETS = {
    "gemma4_e2b": gemma4_e2b,
    "gemma4_e4b": gemma4_e4b,
    "gemma4_31b": gemma4_31b,
    "gemma4_26b_a4b": gemma4_26b_a4b,
    "tiny": tiny,
    "small": small,
}


def preset(name: str) -> ModelConfig:
  """Returns the named preset; unknown names raise a ValueError listing the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]()
