"""Tiny Hugging Face Gemma 4 target/assistant pairs and a recorder of HF assisted (MTP) generation.

Helper module imported by tests (not collected by pytest). It needs `torch` and `transformers` (5.24); the
behaviour it records is documented in `experiments/hf_assisted_reference.md`.

* `make_hf_pair(kind, directory)` builds a tiny random `Gemma4ForCausalLM` target and a matching
  `Gemma4AssistantForCausalLM`, float32 / eager attention, and saves them under `directory/target` and
  `directory/assistant` (`save_pretrained`: config.json, generation_config.json, model.safetensors).
* `record_hf_assisted(target, assistant, prompt_ids, ...)` runs `target.generate(..., assistant_model=assistant)`
  (batch 1) with forward hooks on the target, the assistant and its attention modules (transformers itself is not
  modified) and returns, round by round, the drafts, the inputs/outputs of every assistant forward and the absolute
  target positions of the K/V entries each assistant layer type saw and attended to.

Run `python -m tests.hf_assist` (from the repository root) for a demo printing the recorded rounds of both kinds.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
)

SLIDING = "sliding_attention"
FULL = "full_attention"

VOCAB = 256
TARGET_HIDDEN = 64
ASSISTANT_HIDDEN = 32
HEAD_DIM = 16
GLOBAL_HEAD_DIM = 32
SLIDING_WINDOW = 8
NUM_CENTROIDS = 16  # 256 / 16 = 16 tokens per cluster
CENTROID_TOP_K = 4  # 4 clusters -> 64 candidate tokens
FIRST_NORMAL_TOKEN = 3  # 0 pad, 1 eos (disabled in the configs), 2 bos

KINDS = ("dense", "centroid")

# Scales of the "context" branches (post-attention / post-FFN / post-PLE norm weights) relative to the sqrt(D)-scaled
# token embedding, and of the assistant's random reads of [embedding, hidden]; they set how often drafts agree.
TARGET_BRANCH_SCALE = 0.5
ASSISTANT_BRANCH_SCALE = 0.15
PRE_EMB_NOISE = 0.05
PRE_HIDDEN_READ = 0.1
PLE_BRANCH_SCALE = 0.2
CLUSTER_COHERENCE = 0.8
BIGRAM_FFN_SCALE = 2.0  # RMS of the target's layer-0 FFN output relative to sqrt(Dt) * E_low


# ----------------------------------------------------------------------------------------------------------------
# Tiny pair
# ----------------------------------------------------------------------------------------------------------------


def _target_config(kind: str, plain_target: bool) -> Gemma4TextConfig:
  """31B-like target for "dense" (K=V full layers), E2B-like for "centroid" (PLE, KV sharing, double-wide MLP)."""
  s, f = SLIDING, FULL
  common = dict(
      vocab_size=VOCAB,
      hidden_size=TARGET_HIDDEN,
      intermediate_size=64,  # = the assistant's (its layer-0 MLP copies the target's)
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=HEAD_DIM,
      global_head_dim=GLOBAL_HEAD_DIM,
      sliding_window=SLIDING_WINDOW,
      final_logit_softcapping=15.0,
      max_position_embeddings=4096,
      eos_token_id=None,  # never stop early: rounds are then a function of max_new_tokens only
      bos_token_id=2,
      pad_token_id=0,
      tie_word_embeddings=True,
      attn_implementation="eager",
      dtype=torch.float32,
  )
  if kind == "dense":
    return Gemma4TextConfig(
        num_hidden_layers=5,
        layer_types=[s, s, f, s, f],
        attention_k_eq_v=not plain_target,
        num_global_key_value_heads=None if plain_target else 1,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        **common,
    )
  if kind == "centroid":
    if plain_target:
      return Gemma4TextConfig(
          num_hidden_layers=6, layer_types=[s, s, f, s, s, f], hidden_size_per_layer_input=0,
          vocab_size_per_layer_input=0, **common)
    # layers 0,1,2 compute K/V (1 = sliding tap, 2 = full tap); 3,4 reuse layer 1, 5 reuses layer 2.
    return Gemma4TextConfig(
        num_hidden_layers=6,
        layer_types=[s, s, f, s, s, f],
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
        **common,
    )
  raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _assistant_config(kind: str, tcfg: Gemma4TextConfig) -> Gemma4AssistantConfig:
  full_layer = tcfg.layer_types.index(FULL)
  sliding_layer = tcfg.layer_types.index(SLIDING)
  text = Gemma4TextConfig(
      vocab_size=VOCAB,
      hidden_size=ASSISTANT_HIDDEN,
      intermediate_size=64,
      num_hidden_layers=4,
      layer_types=[SLIDING, SLIDING, SLIDING, FULL],
      num_attention_heads=4,
      # Per-type KV head counts and head dims must equal the target tap layers' (the drafter reads their K/V).
      num_key_value_heads=tcfg.per_layer_config[sliding_layer].num_key_value_heads,
      head_dim=HEAD_DIM,
      global_head_dim=GLOBAL_HEAD_DIM,
      attention_k_eq_v=tcfg.attention_k_eq_v,
      num_global_key_value_heads=(
          tcfg.per_layer_config[full_layer].num_key_value_heads if tcfg.attention_k_eq_v else None),
      sliding_window=tcfg.sliding_window,
      final_logit_softcapping=None,
      max_position_embeddings=tcfg.max_position_embeddings,
      hidden_size_per_layer_input=0,
      vocab_size_per_layer_input=0,
      eos_token_id=None,
      bos_token_id=2,
      pad_token_id=0,
      tie_word_embeddings=True,
  )
  cfg = Gemma4AssistantConfig(
      text_config=text,
      backbone_hidden_size=tcfg.hidden_size,
      use_ordered_embeddings=(kind == "centroid"),
      num_centroids=NUM_CENTROIDS,
      centroid_intermediate_top_k=CENTROID_TOP_K,
      attn_implementation="eager",
      dtype=torch.float32,
  )
  return cfg


def _norm_weight(shape, gen, scale=1.0, spread=0.3):
  w = scale * (1.0 + spread * torch.randn(shape, generator=gen))
  # keep away from 0 so no dimension is silently dropped
  return torch.where(w.abs() < 0.2 * scale, torch.full_like(w, 0.2 * scale), w)


@torch.no_grad()
def _init_pair(kind, target, assistant, seed):
  """Deterministic weights: random everywhere, norms/layer_scalar != 1, and drafts that often match the target.

  Token embeddings live mostly in the first Da (=32) dims: E_t = [E_low, 0.05 * noise], and the sqrt(Dt)-scaled
  embedding plus a large layer-0 FFN branch (acting on those dims only) dominate the target's residual stream; the
  other attention/FFN/PLE branches add context-dependent perturbations. The assistant's pre_projection copies
  sqrt(Dt) * E_low[tok] (plus small random reads of the embedding and of the hidden state), its layer-0 FFN copies the
  target's, and its head is E_a = E_low * w_f[:Da] / w_a (w_f, w_a: final-norm weights), so its argmax mostly
  reproduces the target's "bigram" next-token map. For "centroid", the embeddings of the tokens of one cluster of the
  random `token_ordering` are correlated and the centroids are the cluster means (+ noise). Typical greedy rounds
  with K=4 then accept 0..4 drafts.
  """
  gen = torch.Generator().manual_seed(seed)
  dt, da, v = TARGET_HIDDEN, ASSISTANT_HIDDEN, VOCAB

  def randn(*shape, std=1.0):
    return std * torch.randn(*shape, generator=gen)

  for model in (target, assistant):
    for name, mod in model.named_modules():
      if isinstance(mod, torch.nn.Linear):
        mod.weight.copy_(randn(*mod.weight.shape, std=1.0 / math.sqrt(mod.in_features)))

  # ---- target ----
  if kind == "centroid":
    # clusters of the (random) token_ordering get related embeddings, so that the centroid head's top clusters
    # usually contain the assistant's best token (as they do in a trained drafter)
    ordering = torch.randperm(v, generator=gen)
    centers = randn(NUM_CENTROIDS, da)
    e_low = torch.empty(v, da)
    e_low[ordering] = (CLUSTER_COHERENCE * centers.repeat_interleave(v // NUM_CENTROIDS, 0)
                       + math.sqrt(1 - CLUSTER_COHERENCE**2) * randn(v, da))
  else:
    ordering = None
    e_low = randn(v, da)
  e_t = torch.cat([e_low, randn(v, dt - da, std=0.05)], dim=1)
  target.model.embed_tokens.weight.copy_(e_t)
  tm = target.model
  for layer in tm.layers:
    for nm in ("input_layernorm", "pre_feedforward_layernorm"):
      getattr(layer, nm).weight.copy_(_norm_weight(dt, gen))
    for nm in ("post_attention_layernorm", "post_feedforward_layernorm"):
      getattr(layer, nm).weight.copy_(_norm_weight(dt, gen, scale=TARGET_BRANCH_SCALE))
    if hasattr(layer, "post_per_layer_input_norm"):
      layer.post_per_layer_input_norm.weight.copy_(_norm_weight(dt, gen, scale=PLE_BRANCH_SCALE))
    attn = layer.self_attn
    attn.q_norm.weight.copy_(_norm_weight(attn.head_dim, gen))
    if hasattr(attn, "k_norm"):
      attn.k_norm.weight.copy_(_norm_weight(attn.head_dim, gen))
    layer.layer_scalar.fill_(float(0.6 + 0.8 * torch.rand((), generator=gen)))
  if getattr(tm, "hidden_size_per_layer_input", 0):
    tm.embed_tokens_per_layer.weight.copy_(randn(*tm.embed_tokens_per_layer.weight.shape))
    tm.per_layer_projection_norm.weight.copy_(_norm_weight(tm.hidden_size_per_layer_input, gen))
  w_f = randn(dt)
  w_f = torch.where(w_f.abs() < 0.3, torch.sign(w_f + 1e-9) * 0.3, w_f)  # random signs, |w| >= 0.3
  tm.norm.weight.copy_(w_f)

  # Layer-0 FFN of the target works on the first Da dims only and is large: it makes the next-token map asymmetric
  # (a tied-embedding bilinear map alone only ever produces 2-cycles). The assistant's layer 0 copies it below.
  t_mlp, t_l0 = tm.layers[0].mlp, tm.layers[0]
  t_mlp.gate_proj.weight[:, da:] = 0
  t_mlp.up_proj.weight[:, da:] = 0
  t_mlp.down_proj.weight[da:, :] = 0
  t_l0.post_feedforward_layernorm.weight[:da] *= BIGRAM_FFN_SCALE * math.sqrt(dt) / TARGET_BRANCH_SCALE

  # ---- assistant ----
  am = assistant.model
  # z0 = pre_projection([sqrt(Dt) * E_t[tok], h]) ~= sqrt(Dt) * E_low[tok] + small random reads of [embedding, hidden]
  # (relative to sqrt(Dt) * E_low, the residual stream has the same scale as the target's).
  pre = torch.cat([randn(da, dt, std=PRE_EMB_NOISE / math.sqrt(dt)), randn(da, dt, std=PRE_HIDDEN_READ)], 1)
  pre[:, :da] += torch.eye(da)
  assistant.pre_projection.weight.copy_(pre)
  for layer in am.layers:
    for nm in ("input_layernorm", "pre_feedforward_layernorm"):
      getattr(layer, nm).weight.copy_(_norm_weight(da, gen))
    for nm in ("post_attention_layernorm", "post_feedforward_layernorm"):
      getattr(layer, nm).weight.copy_(_norm_weight(da, gen, scale=ASSISTANT_BRANCH_SCALE))
    layer.self_attn.q_norm.weight.copy_(_norm_weight(layer.self_attn.head_dim, gen))
    layer.layer_scalar.fill_(float(0.6 + 0.8 * torch.rand((), generator=gen)))
  a_mlp, a_l0 = am.layers[0].mlp, am.layers[0]
  a_mlp.gate_proj.weight.copy_(t_mlp.gate_proj.weight[:, :da])
  a_mlp.up_proj.weight.copy_(t_mlp.up_proj.weight[:, :da])
  a_mlp.down_proj.weight.copy_(t_mlp.down_proj.weight[:da, :])
  # RMS over Dt dims (upper half ~0) = RMS over the first Da dims / sqrt(Dt / Da)
  a_l0.pre_feedforward_layernorm.weight.copy_(t_l0.pre_feedforward_layernorm.weight[:da] * math.sqrt(dt / da))
  a_l0.post_feedforward_layernorm.weight.copy_(t_l0.post_feedforward_layernorm.weight[:da] * math.sqrt(dt / da))
  w_a = _norm_weight(da, gen)
  am.norm.weight.copy_(w_a)
  e_a = e_low * (w_f[:da] / w_a)[None, :]
  am.embed_tokens.weight.copy_(e_a)  # tied with lm_head
  assert assistant.lm_head.weight.data_ptr() == am.embed_tokens.weight.data_ptr()
  if assistant.masked_embedding is not None:
    me = assistant.masked_embedding
    me.token_ordering.copy_(ordering)
    clusters = e_a[ordering].view(NUM_CENTROIDS, v // NUM_CENTROIDS, da)
    me.centroids.weight.copy_(clusters.mean(1) + randn(NUM_CENTROIDS, da, std=0.1))


def make_hf_pair(kind: str, directory, *, seed: int = 0, num_assistant_tokens: int = 4,
                 plain_target: bool = False):
  """Build, save and return a tiny float32 (target, assistant) pair; eval mode, eager attention.

  kind "dense": 5-layer target S,S,F,S,F with 31B-style K=V full layers (1 global KV head); the assistant has a dense
  tied head (like the 31B/26B assistants). kind "centroid": 6-layer E2B-style target S,S,F,S,S,F with per-layer
  embeddings (P=8), KV sharing (layers 3-5 reuse layers 1/2; taps = layers 1 and 2) and double-wide MLPs on the
  shared layers; the assistant uses the ordered-embedding (centroid) head with 16 centroids, top-4 (64 candidates),
  `masked_embedding.token_ordering` = a random permutation. `plain_target=True` drops K=V / PLE / KV sharing.
  Both: V=256, target D=64, assistant D=32, head_dim 16, global_head_dim 32, W=8, target softcap 15, EOS disabled.
  The assistant's generation_config gets `num_assistant_tokens` and schedule "constant".
  Files: `directory/target` and `directory/assistant`.
  """
  with _torch_threads(1):
    return _make_hf_pair(kind, directory, seed, num_assistant_tokens, plain_target)


def _make_hf_pair(kind, directory, seed, num_assistant_tokens, plain_target):
  tcfg = _target_config(kind, plain_target)
  torch.manual_seed(seed)
  target = Gemma4ForCausalLM(tcfg).to(torch.float32).eval()
  assistant = Gemma4AssistantForCausalLM(_assistant_config(kind, tcfg)).to(torch.float32).eval()
  _init_pair(kind, target, assistant, seed)
  assistant.generation_config.num_assistant_tokens = num_assistant_tokens
  assistant.generation_config.num_assistant_tokens_schedule = "constant"
  for m in (target, assistant):
    m.generation_config.eos_token_id = None
  directory = os.fspath(directory)
  target.save_pretrained(os.path.join(directory, "target"))
  assistant.save_pretrained(os.path.join(directory, "assistant"))
  return target, assistant


def load_hf_pair(directory):
  """Reload a pair saved by `make_hf_pair` (float32, eager)."""
  directory = os.fspath(directory)
  target = Gemma4ForCausalLM.from_pretrained(
      os.path.join(directory, "target"), dtype=torch.float32, attn_implementation="eager").eval()
  assistant = Gemma4AssistantForCausalLM.from_pretrained(
      os.path.join(directory, "assistant"), dtype=torch.float32, attn_implementation="eager").eval()
  return target, assistant


# ----------------------------------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------------------------------


class _torch_threads:
  """Temporarily run torch on n threads (tiny models: threading only adds overhead, and hurts a lot on busy hosts)."""

  def __init__(self, n: int = 1):
    self.n = n

  def __enter__(self):
    self.old = torch.get_num_threads()
    torch.set_num_threads(self.n)

  def __exit__(self, *exc):
    torch.set_num_threads(self.old)


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().to(torch.float32).cpu().numpy().copy()


def _visible_from_mask(mask, kv_len: int) -> np.ndarray:
  """Indices (into the kv buffer) a single query may attend to, from a 4D additive/bool mask (None = all)."""
  if mask is None:
    return np.arange(kv_len)
  m = mask[0, 0, -1]
  assert m.shape[-1] == kv_len, (m.shape, kv_len)
  ok = m if m.dtype == torch.bool else (m == 0)
  return np.nonzero(ok.cpu().numpy())[0]


def _tap_layers(cfg) -> dict[str, int]:
  """Index of the target layer whose K/V `shared_kv_states[type]` holds (the "store" layers)."""
  modes = cfg.kv_sharing_modes
  return {t: i for i, (t, m) in enumerate(zip(cfg.layer_types, modes)) if m == "store"}


def record_hf_assisted(target, assistant, prompt_ids, *, max_new_tokens: int, num_assistant_tokens: int,
                       do_sample: bool = False, seed: int = 0, **generate_kwargs) -> dict[str, Any]:
  """Run HF assisted generation (batch 1) and record every round.

  Returns a dict with
    prompt_ids, prompt_len P, max_length (= P + max_new_tokens), sliding_window (target W),
    assistant_sliding_window, num_assistant_tokens K, do_sample,
    sequence / new_tokens: output of `target.generate(..., assistant_model=assistant)`,
    greedy_sequence / greedy_new_tokens: plain `target.generate(do_sample=False)` (no assistant),
    target_calls: one entry per target forward (0 = prefill, then one verify per round):
        {start (absolute position of the first input), n_inputs, input_ids, hidden (np [n_inputs, Dt]: final-normed
         hidden_states[-1]), argmax (argmax of the kept logits rows: prefill last row only, verify K'+1 rows), kv_len {type: buffer length of
         shared_kv_states[type]}, kv_positions {type: absolute position of each buffer entry}},
    rounds: one entry per drafting round r (drafted from target_calls[r], verified by target_calls[r+1]):
        seq_len L (input_ids length when drafting; the query position is L-1), num_drafts K', drafts [K'],
        accepted_tokens (tokens appended to the sequence by this round), num_accepted (accepted drafts n; the
        round appends n+1 tokens), verify_start (= L-1), verify_input_ids ([x[L-1]] + drafts),
        hidden_source (absolute position, in the previous target call, of the hidden state used at step 0),
        taps {type: {positions (absolute, of the sliced buffer the drafter received), keys, values (np
              [Nkv, n, hd])}},
        steps: one per assistant forward, {token_id, position_ids, h_in (np [Dt]), h_in_first4, h_in_source
               ("target" or "assistant"), logits (np [V]), argmax, h_out (np [Dt], post_projection output),
               kv_len {type: n entries received}, visible {type: absolute positions allowed by the mask the
               assistant built}, attended {type: {assistant layer idx: absolute positions with attention prob > 0}},
               stale {type: visible absolute positions whose K differs from a clean forward of the final sequence
               (K/V of rejected drafts)}}.
  How positions are derived: a target call with first input position `start` and `n` inputs has processed up to
  e = start + n - 1; each tap buffer ends at e (caches append new K/V at the end), so buffer entry i of a buffer of
  length N is at e - N + 1 + i (full buffers have N = e + 1, i.e. entry i = position i). The candidate generator
  slices `[:, :, :L]` from the front, keeping these positions. `visible` maps the mask that
  `assistant.create_attention_masks` builds for the same inputs onto those positions; `attended` comes from the
  eager attention probabilities of each assistant attention module (exact zeros = masked).
  """
  with torch.no_grad(), _torch_threads(1):
    return _record(target, assistant, prompt_ids, max_new_tokens=max_new_tokens,
                   num_assistant_tokens=num_assistant_tokens, do_sample=do_sample, seed=seed, **generate_kwargs)


def _record(target, assistant, prompt_ids, *, max_new_tokens, num_assistant_tokens, do_sample, seed, **generate_kwargs):
  prompt = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long).reshape(1, -1)
  p_len = prompt.shape[1]
  tcfg = target.config.get_text_config()
  acfg = assistant.config.get_text_config()
  taps = _tap_layers(tcfg)
  emb_mod = target.get_input_embeddings()
  emb_all = emb_mod(torch.arange(tcfg.vocab_size).reshape(1, -1))[0]  # the exact op the generator uses
  dt = tcfg.hidden_size

  events: list[tuple[str, dict]] = []

  # ---- target hooks ----
  def t_pre(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    start = int(cache.get_seq_length()) if cache is not None else 0
    ids = kwargs.get("input_ids", args[0] if args else None)
    events.append(("target", {"start": start, "input_ids": ids[0].tolist()}))

  def t_post(module, args, kwargs, out):
    rec = events[-1][1]
    n = len(rec["input_ids"])
    e = rec["start"] + n - 1
    rec["n_inputs"] = n
    rec["hidden"] = _np(out.hidden_states[-1][0])
    rec["argmax"] = out.logits[0].argmax(-1).tolist()[-n:] if out.logits.shape[1] >= 1 else []
    rec["kv_len"], rec["kv_positions"], rec["_kv"] = {}, {}, {}
    for typ, (k, v) in out.shared_kv_states.items():
      n_kv = k.shape[-2]
      rec["kv_len"][typ] = n_kv
      rec["kv_positions"][typ] = np.arange(e - n_kv + 1, e + 1)
      rec["_kv"][typ] = (k, v)

  # ---- assistant hooks ----
  attn_probs: dict[int, torch.Tensor] = {}

  def a_pre(module, args, kwargs):
    attn_probs.clear()
    emb = kwargs["inputs_embeds"]
    skv = kwargs["shared_kv_states"]
    masks = module.create_attention_masks(module.pre_projection(emb), kwargs.get("attention_mask"), skv)
    e_part = emb[0, -1, :dt]
    diff = (emb_all - e_part[None]).abs().amax(-1)
    tok = int(diff.argmin())
    assert float(diff[tok]) == 0.0, "assistant input embedding is not a target token embedding"
    rec = {
        "token_id": tok,
        "position_ids": kwargs["position_ids"][0].tolist(),
        "h_in": _np(emb[0, -1, dt:]),
        "attention_mask_len": None if kwargs.get("attention_mask") is None else kwargs["attention_mask"].shape[-1],
        "_skv": {t: (k, v) for t, (k, v) in skv.items()},
        "kv_len": {t: k.shape[-2] for t, (k, v) in skv.items()},
        "_visible_idx": {t: _visible_from_mask(masks[t], skv[t][0].shape[-2]) for t in skv},
    }
    rec["h_in_first4"] = rec["h_in"][:4].tolist()
    events.append(("assistant", rec))

  def a_post(module, args, kwargs, out):
    rec = events[-1][1]
    rec["logits"] = _np(out.logits[0, -1])
    rec["argmax"] = int(out.logits[0, -1].argmax())
    rec["h_out"] = _np(out.last_hidden_state[0, -1])
    rec["_attended_idx"] = {}
    for li, pr in attn_probs.items():
      typ = acfg.layer_types[li]
      rec["_attended_idx"].setdefault(typ, {})[li] = np.nonzero((pr[0, :, -1] > 0).any(0).cpu().numpy())[0]

  def make_attn_hook(li):
    def hook(module, args, out):
      if isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
        attn_probs[li] = out[1].detach()
    return hook

  old_k = assistant.generation_config.num_assistant_tokens
  old_sched = assistant.generation_config.num_assistant_tokens_schedule
  assistant.generation_config.num_assistant_tokens = num_assistant_tokens
  assistant.generation_config.num_assistant_tokens_schedule = "constant"
  handles = [
      target.register_forward_pre_hook(t_pre, with_kwargs=True),
      target.register_forward_hook(t_post, with_kwargs=True),
      assistant.register_forward_pre_hook(a_pre, with_kwargs=True),
      assistant.register_forward_hook(a_post, with_kwargs=True),
  ]
  for li, layer in enumerate(assistant.model.layers):
    handles.append(layer.self_attn.register_forward_hook(make_attn_hook(li)))
  ones = torch.ones_like(prompt)
  kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, attention_mask=ones)
  kw.update(generate_kwargs)
  try:
    if do_sample:
      torch.manual_seed(seed)
    seq = target.generate(prompt, assistant_model=assistant, **kw)
  finally:
    for h in handles:
      h.remove()
    assistant.generation_config.num_assistant_tokens = old_k
    assistant.generation_config.num_assistant_tokens_schedule = old_sched
  seq = seq[0].tolist()

  gkw = dict(kw, do_sample=False)
  for k in ("temperature", "top_k", "top_p"):
    gkw.pop(k, None)
  greedy = target.generate(prompt, **gkw)[0].tolist()

  # ---- clean reference K of the final sequence (no cache): K of every accepted token at its position ----
  full_out = target(torch.tensor([seq]), use_cache=False, return_shared_kv_states=True)
  ref_k = {t: k for t, (k, v) in full_out.shared_kv_states.items()}

  # ---- assemble rounds ----
  target_calls: list[dict] = []
  rounds: list[dict] = []
  pending: list[dict] = []
  for kind_, rec in events:
    if kind_ == "assistant":
      pending.append(rec)
      continue
    if target_calls:  # a verify call closes the round drafted from the previous target call
      rounds.append(_make_round(target_calls[-1], pending, rec, ref_k, seq))
    pending = []
    target_calls.append(rec)
  assert not pending, "assistant calls after the last target call"
  # accepted tokens per round: from the next round's length (or the final length)
  for i, r in enumerate(rounds):
    nxt = rounds[i + 1]["seq_len"] if i + 1 < len(rounds) else len(seq)
    r["accepted_tokens"] = seq[r["seq_len"]:nxt]
    r["num_accepted"] = nxt - r["seq_len"] - 1
  for tc in target_calls:
    tc.pop("_kv", None)

  return {
      "prompt_ids": prompt[0].tolist(),
      "prompt_len": p_len,
      "max_length": p_len + max_new_tokens,
      "sliding_window": tcfg.sliding_window,
      "assistant_sliding_window": acfg.sliding_window,
      "num_assistant_tokens": num_assistant_tokens,
      "do_sample": do_sample,
      "tap_layers": taps,
      "sequence": seq,
      "new_tokens": seq[p_len:],
      "greedy_sequence": greedy,
      "greedy_new_tokens": greedy[p_len:],
      "target_calls": target_calls,
      "rounds": rounds,
  }


def _make_round(prev: dict, steps: list[dict], verify: dict, ref_k: dict, seq: list[int]) -> dict:
  seq_len = verify["start"] + 1
  rnd: dict[str, Any] = {
      "seq_len": seq_len,
      "num_drafts": len(steps),
      "drafts": [s["argmax"] for s in steps],
      "verify_start": verify["start"],
      "verify_input_ids": verify["input_ids"],
      "prev_target_call": {"start": prev["start"], "n_inputs": prev["n_inputs"]},
      "taps": {},
      "steps": [],
  }
  if steps:
    assert verify["input_ids"][1:] == rnd["drafts"], (verify["input_ids"], rnd["drafts"])
    # step 0's hidden state: which row of the previous target call's final-normed hidden states
    h0 = steps[0]["h_in"]
    rows = [i for i in range(prev["n_inputs"]) if np.array_equal(prev["hidden"][i], h0)]
    assert len(rows) == 1, rows
    rnd["hidden_source"] = prev["start"] + rows[0]
    for typ, (k, v) in steps[0]["_skv"].items():
      n = k.shape[-2]
      full_k, _ = prev["_kv"][typ]
      assert torch.equal(full_k[..., :n, :], k), "drafter K/V is not a prefix of the last target call's buffer"
      rnd["taps"][typ] = {"positions": prev["kv_positions"][typ][:n], "keys": _np(k[0]), "values": _np(v[0])}
  skv0 = steps[0]["_skv"] if steps else {}
  for j, s in enumerate(steps):
    if j > 0:  # later steps: previous step's outputs, same K/V buffers
      assert np.array_equal(s["h_in"], steps[j - 1]["h_out"])
      assert s["token_id"] == steps[j - 1]["argmax"]
      assert all(torch.equal(s["_skv"][t][0], skv0[t][0]) for t in skv0)
    s["h_in_source"] = "target" if j == 0 else "assistant"
    s["visible"], s["attended"], s["stale"] = {}, {}, {}
    for typ, (k, _) in s["_skv"].items():
      pos = rnd["taps"][typ]["positions"]
      vis_idx = s["_visible_idx"][typ]
      s["visible"][typ] = pos[vis_idx]
      s["attended"][typ] = {li: pos[idx] for li, idx in s.get("_attended_idx", {}).get(typ, {}).items()}
      stale = [int(pos[i]) for i in vis_idx
               if pos[i] >= len(seq) or not torch.allclose(k[0, :, i], ref_k[typ][0, :, pos[i]], atol=1e-4, rtol=1e-4)]
      s["stale"][typ] = np.asarray(stale, dtype=np.int64)
    rnd["steps"].append(s)
  for s in steps:
    for key in ("_skv", "_visible_idx", "_attended_idx"):
      s.pop(key, None)
  return rnd


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------


def _fmt_pos(p) -> str:
  p = list(map(int, p))
  if not p:
    return "[]"
  if p == list(range(p[0], p[-1] + 1)):
    return f"{p[0]}..{p[-1]} ({len(p)})"
  return str(p)


def print_record(rec: dict) -> None:
  print(f"P={rec['prompt_len']} max_length={rec['max_length']} W={rec['sliding_window']} "
        f"K={rec['num_assistant_tokens']} do_sample={rec['do_sample']} taps={rec['tap_layers']}")
  print(f"assisted == greedy: {rec['sequence'] == rec['greedy_sequence']}")
  for i, r in enumerate(rec["rounds"]):
    print(f"round {i}: L={r['seq_len']} query_pos={r['seq_len'] - 1} K'={r['num_drafts']} drafts={r['drafts']} "
          f"accepted={r['num_accepted']} +{r['accepted_tokens']} hidden_from_pos={r.get('hidden_source')}")
    if r["steps"]:
      s0 = r["steps"][0]
      for typ in (SLIDING, FULL):
        print(f"    {typ:17s} buffer={_fmt_pos(r['taps'][typ]['positions'])} visible={_fmt_pos(s0['visible'][typ])} "
              f"stale={s0['stale'][typ].tolist()}")
      for j, s in enumerate(r["steps"]):
        print(f"    step {j}: tok={s['token_id']} pos={s['position_ids']} h_in[:4]="
              f"{np.round(s['h_in_first4'], 3).tolist()} ({s['h_in_source']}) -> argmax {s['argmax']}")


if __name__ == "__main__":
  import tempfile

  torch.set_grad_enabled(False)
  rng = np.random.default_rng(0)
  prompt = rng.integers(FIRST_NORMAL_TOKEN, VOCAB, size=13).tolist()
  for kind in KINDS:
    with tempfile.TemporaryDirectory() as d:
      t, a = make_hf_pair(kind, d)
      print(f"===== {kind} =====")
      print_record(record_hf_assisted(t, a, prompt, max_new_tokens=30, num_assistant_tokens=4))
