"""Tiny random `transformers` Gemma 4 models for parity and checkpoint tests (a helper module).

Every builder is deterministic (`torch.manual_seed`), float32, eager attention, and saved with
`save_pretrained`. Weights are re-drawn with std 1/sqrt(fan_in) so activations and logits are O(1),
and every norm weight, `layer_scalar`, router scale and per-expert scale is drawn uniformly from
[0.5, 1.5], so a bug in how any of them is used changes the outputs visibly.

Kinds:
  e2b_like:  PLE (P=8), KV sharing of the last 5 of 10 layers, double-wide MLP, (S,S,S,S,F) x 2.
  31b_like:  attention_k_eq_v, 2 sliding / 1 full KV heads, head_dim 16 / global_head_dim 32.
  moe:       MoE block (8 experts, top-2, expert width 16) on every layer, k_eq_v.
  pattern:   transformers' default 5:1 layer pattern on 7 layers (S x 5, F, F).
"""

from __future__ import annotations

import math
import pathlib

import torch
import transformers

KINDS = ("e2b_like", "31b_like", "moe", "pattern")

_COMMON = dict(
    head_dim=16,
    global_head_dim=32,
    sliding_window=8,
    final_logit_softcapping=30.0,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
)


def hf_config(kind: str) -> transformers.Gemma4TextConfig:
  """The `Gemma4TextConfig` of one of `KINDS`."""
  if kind == "e2b_like":
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
              num_attention_heads=4, num_key_value_heads=1,
              layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
              num_kv_shared_layers=5, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
              use_double_wide_mlp=True, attention_k_eq_v=False)
  elif kind == "31b_like":
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
              layer_types=["sliding_attention"] * 5 + ["full_attention"], attention_k_eq_v=True,
              hidden_size_per_layer_input=0)
  elif kind == "moe":
    kw = dict(vocab_size=192, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
              layer_types=["sliding_attention"] * 3 + ["full_attention"], attention_k_eq_v=True,
              enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
              hidden_size_per_layer_input=0)
  elif kind == "pattern":
    kw = dict(vocab_size=160, hidden_size=48, intermediate_size=64, num_hidden_layers=7,
              num_attention_heads=4, num_key_value_heads=2, layer_types=None,
              hidden_size_per_layer_input=0)
  else:
    raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
  return transformers.Gemma4TextConfig(**_COMMON, **kw, attn_implementation="eager")


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Re-draws the weights of `model` in place (see the module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("q_norm.weight", "k_norm.weight")):
      # These scale the attention logits quadratically (Gemma 4 has no 1/sqrt(H)); above ~0.8
      # the softmax gets so peaked that float32 rounding alone moves the logits by ~1e-4.
      p.copy_(0.4 + 0.4 * torch.rand(p.shape, generator=gen))
    elif p.ndim == 1 or leaf in ("scale", "per_expert_scale"):  # norms, router scales
      p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    elif name.endswith("experts.gate_up_proj"):  # [E, 2X, D]
      p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[2]))
    elif name.endswith("experts.down_proj"):  # [E, D, X]
      p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[2]))
    elif "embed_tokens" in name:  # [V, D] (and PLE [V, L*P]): unit-scale after the sqrt(D) scaling
      p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    else:  # nn.Linear [out, in]
      p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
  for name, b in model.named_buffers():
    if name.endswith("layer_scalar"):
      b.fill_(0.5 + torch.rand((), generator=gen).item())
  return model


def make_hf_target(kind: str, directory: str | pathlib.Path) -> transformers.Gemma4ForCausalLM:
  """Builds a tiny random `Gemma4ForCausalLM` of `kind`, saves it into `directory`, returns it.

  The model is in eval mode; `directory` receives config.json, generation_config.json and
  model.safetensors.
  """
  cfg = hf_config(kind)
  torch.manual_seed(0)
  model = transformers.Gemma4ForCausalLM(cfg).to(torch.float32)
  perturb_(model, seed=KINDS.index(kind))
  model.generation_config.pad_token_id = 0
  model.generation_config.eos_token_id = 1
  model.generation_config.bos_token_id = 2
  model.eval()
  model.save_pretrained(str(directory))
  return model


def make_tiny_params(kind: str, directory: str | pathlib.Path):
  """(cfg, params, hf_model): a tiny HF model of `kind`, saved into `directory`, loaded by ours."""
  from gemma_mtp import checkpoint  # pylint: disable=g-import-not-at-top
  model = make_hf_target(kind, directory)
  cfg = checkpoint.read_hf_config(directory)
  params, _ = checkpoint.load_hf_params(directory, cfg)
  return cfg, params, model
