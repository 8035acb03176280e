"""MTP drafter tests: one-step parity with `transformers`' Gemma4Assistant, and checkpoints.

The reference pair comes from tests/hf_assist.make_hf_pair (float32, eager): "dense" (31B-like K=V
target, dense tied head) and "centroid" (E2B-like target with PLE + KV sharing, ordered-embedding
head). The HF assistant is called exactly as `SinglePositionMultiTokenCandidateGenerator` does after
the prefill (see experiments/hf_assisted_reference.md).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import safetensors.numpy  # noqa: E402

import gemma_mtp  # noqa: E402
from gemma_mtp import checkpoint  # noqa: E402
from gemma_mtp import config as config_lib  # noqa: E402
from gemma_mtp import drafter as drafter_lib  # noqa: E402
from gemma_mtp import model as model_lib  # noqa: E402
from tests import hf_assist  # noqa: E402

PROMPT_LEN = 20     # > W = 8: the sliding mask really cuts
NUM_STEPS = 3
HF_TYPE = {"sliding": "sliding_attention", "full": "full_attention"}


# ---- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """kind -> (directory, hf target, hf assistant, our Target, our Drafter)."""
  out = {}
  for kind in hf_assist.KINDS:
    d = tmp_path_factory.mktemp(f"pair_{kind}")
    target, assistant = hf_assist.make_hf_pair(kind, d)
    ours_t = gemma_mtp.load_target(d / "target")
    ours_d = gemma_mtp.load_drafter(d / "assistant", ours_t)
    out[kind] = (d, target, assistant, ours_t, ours_d)
  return out


def flat_np(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in checkpoint._flat(tree).items()}


def assert_trees_equal(a, b):
  fa, fb = flat_np(a), flat_np(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def edited_copy(src: pathlib.Path, dst: pathlib.Path, *, config=None, tensors=None) -> pathlib.Path:
  """A copy of HF dir `src` with `config(dict)` / `tensors(dict)` edits applied in place."""
  shutil.copytree(src, dst)
  if config is not None:
    c = json.loads((dst / "config.json").read_text())
    config(c)
    (dst / "config.json").write_text(json.dumps(c))
  if tensors is not None:
    t = safetensors.numpy.load_file(dst / "model.safetensors")
    tensors(t)
    safetensors.numpy.save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


# ---- one drafter step vs. transformers ----------------------------------------------------------

@pytest.mark.parametrize("kind", hf_assist.KINDS)
def test_step_parity_after_prefill(pairs, kind):
  _, target, assistant, ours_t, ours_d = pairs[kind]
  dcfg, P = ours_d.config, PROMPT_LEN
  prompt = np.random.default_rng(1).integers(hf_assist.FIRST_NORMAL_TOKEN, hf_assist.VOCAB, P)

  # Reference: target prefill, then the candidate generator's assistant calls (L = P + 1).
  with torch.no_grad():
    out = target(torch.tensor(prompt[None]), output_hidden_states=True,
                 return_shared_kv_states=True, use_cache=False)
  kv = out.shared_kv_states
  first = int(out.logits[0, -1].argmax())           # x[P], plain greedy after the prefill
  L = P + 1
  hf_taps = {k: (v[0][:, :, :L], v[1][:, :, :L]) for k, v in kv.items()}
  embed = target.get_input_embeddings()

  # Ours: target forward -> taps [B, T, K, H] and final-normed hidden; prefill masks.
  fwd = jax.jit(model_lib.forward, static_argnames="config")(
      ours_t.params, jnp.asarray(prompt[None], jnp.int32), config=ours_t.config)
  np.testing.assert_allclose(np.asarray(fwd.hidden), out.hidden_states[-1].numpy(), atol=1e-5)
  for kind_ours, kind_hf in HF_TYPE.items():  # the taps are the target's K/V
    k_hf, v_hf = (t.numpy().transpose(0, 2, 1, 3) for t in kv[kind_hf])
    np.testing.assert_allclose(np.asarray(fwd.taps[kind_ours].k), k_hf, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fwd.taps[kind_ours].v), v_hf, atol=1e-5)
  one = lambda v: jnp.full((1,), v, jnp.int32)  # noqa: E731
  masks, query = drafter_lib.tap_masks(fwd.taps, convention="hf", window=dcfg.sliding_window,
                                       start=one(0), last_idx=one(P), call_start=one(0),
                                       call_end=one(P - 1))
  assert np.asarray(masks["full"]).sum() == P                       # the whole prompt
  assert np.flatnonzero(masks["sliding"][0]).tolist() == list(range(P - 1 - 8, P))  # last W + 1
  assert int(query[0]) == P

  step = jax.jit(drafter_lib.step, static_argnames=("cfg", "target_config"))
  tok_hf, h_hf = torch.tensor([[first]]), out.hidden_states[-1][:, -1:]
  tok, h = one(first), fwd.hidden[:, -1]
  for i in range(NUM_STEPS):
    with torch.no_grad():
      ref = assistant(inputs_embeds=torch.cat([embed(tok_hf), h_hf], dim=-1),
                      attention_mask=torch.ones(1, L, dtype=torch.long),
                      position_ids=torch.tensor([[L - 1]]), shared_kv_states=hf_taps,
                      use_cache=False)
    logits, h = step(ours_d.params, dcfg, target_params=ours_t.params,
                     target_config=ours_t.config, token=tok, hidden=h, query_pos=query,
                     taps=fwd.taps, masks=masks)
    ref_logits = ref.logits[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-5,
                               err_msg=f"{kind} step {i} logits")
    np.testing.assert_allclose(np.asarray(h), ref.last_hidden_state[:, 0].numpy(), atol=1e-4,
                               rtol=1e-5, err_msg=f"{kind} step {i} hidden")
    assert int(jnp.argmax(logits[0])) == int(ref_logits[0].argmax()), f"{kind} step {i}"
    if kind == "centroid":  # fill value = min(selected) - 1 on every non-candidate entry
      fill = ref_logits[0].min()
      assert np.sum(ref_logits[0] == fill) == hf_assist.VOCAB - 64
      assert np.sum(np.isclose(np.asarray(logits[0]), fill, atol=1e-4)) == hf_assist.VOCAB - 64
    tok_hf, h_hf = ref.logits.argmax(-1), ref.last_hidden_state
    tok = jnp.argmax(logits, -1).astype(jnp.int32)


# ---- loaders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", hf_assist.KINDS)
def test_hf_drafter_config_and_tensors(pairs, kind):
  d, _, assistant, ours_t, ours_d = pairs[kind]
  dcfg = ours_d.config
  assert dcfg == drafter_lib.for_target(
      ours_t.config, embed_dim=32, num_heads=4, mlp_dim=64,
      num_centroids=16 if kind == "centroid" else 0, centroid_top_k=4)
  checkpoint.check_drafter_matches(dcfg, ours_t.config)
  params, report = checkpoint.load_hf_drafter_params(d / "assistant", dcfg)
  state = hf_state(assistant)
  flat = checkpoint._flat(params)
  for name, spec in checkpoint._flat_drafter_specs(dcfg).items():
    np.testing.assert_array_equal(
        checkpoint.params_lib.to_hf(spec, np.asarray(flat[name])), state[spec.hf_key],
        err_msg=spec.hf_key)
  if kind == "centroid":
    assert flat["token_ordering"].dtype == jnp.int32
  assert report["counts"]["loaded"] == len(flat)


@pytest.mark.parametrize("name", sorted(drafter_lib.DRAFTER_PRESETS))
def test_hf_drafter_config_of_presets(tmp_path, name):
  """Presets survive hf_drafter_config -> read, also in the published style (top-level
  global_head_dim / num_global_key_value_heads, no per_layer_config), and fit their targets."""
  dcfg = drafter_lib.DRAFTER_PRESETS[name]()
  target = config_lib.preset(name.replace("_assistant", ""))
  checkpoint.check_drafter_matches(dcfg, target)
  hf = checkpoint.hf_drafter_config(dcfg)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert checkpoint.read_hf_drafter_config(tmp_path, target) == dcfg
  text = hf["text_config"]
  del text["per_layer_config"]
  text.update(global_head_dim=dcfg.global_head_dim, attention_k_eq_v=target.k_eq_v,
              num_global_key_value_heads=dcfg.num_global_kv_heads if target.k_eq_v else None)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  read = checkpoint.read_hf_drafter_config(tmp_path, target, convention="clean")
  assert read == dcfg.replace(convention="clean")
  assert transformers.Gemma4AssistantConfig.from_dict(hf).text_config.num_kv_shared_layers == 4


def test_load_drafter_casts_to_target_dtype(pairs):
  d, _, _, ours_t, _ = pairs["centroid"]
  bf16_target = gemma_mtp.load_target(d / "target", dtype="bfloat16")
  dr = gemma_mtp.load_drafter(d / "assistant", bf16_target)
  assert (dr.config.dtype, dr.config.param_dtype) == ("bfloat16", "bfloat16")
  flat = flat_np(dr.params)
  assert flat["token_ordering"].dtype == np.int32
  assert all(v.dtype == jnp.bfloat16 for k, v in flat.items() if k != "token_ordering")


def _set_text(**kw):
  return lambda c: c["text_config"].update(kw)


@pytest.mark.parametrize("kind, edit, message", [
    ("dense", lambda c: c.update(backbone_hidden_size=48), "backbone_hidden_size) 48 != target "
     "embed_dim 64"),
    ("dense", _set_text(vocab_size=512), "vocab_size 512 != target vocab_size 256"),
    ("dense", _set_text(head_dim=8), "sliding head_dim 8 != target tap layer 3 head_dim 16"),
    ("centroid", _set_text(per_layer_config={"3": {"head_dim": 64}}),
     "full head_dim 64 != target tap layer 2 head_dim 32"),
    ("dense", _set_text(num_key_value_heads=1), "sliding kv heads 1 != target tap layer 3 kv "
     "heads 2"),
    ("dense", _set_text(per_layer_config={"3": {"head_dim": 32, "num_key_value_heads": 2}}),
     "full kv heads 2 != target tap layer 4 kv heads 1"),
    ("dense", _set_text(sliding_window=16), "sliding_window 16 != target sliding_window 8"),
    ("dense", lambda c: c.update(model_type="gemma4_text"), "'gemma4_text' is not a Gemma 4 "
     "drafter"),
    ("dense", _set_text(hidden_size_per_layer_input=8), "hidden_size_per_layer_input=8"),
])
def test_load_drafter_config_errors(pairs, tmp_path, kind, edit, message):
  d, _, _, ours_t, _ = pairs[kind]
  bad = edited_copy(d / "assistant", tmp_path / "bad", config=edit)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    gemma_mtp.load_drafter(bad, ours_t)


def test_drafter_without_full_tap(pairs):
  """A target with no full layer to tap cannot serve a drafter with a full layer."""
  _, _, _, ours_t, ours_d = pairs["dense"]
  sliding_only = ours_t.config.replace(layer_types=("sliding",) * 5)
  with pytest.raises(ValueError, match="drafter has full layers but the target has no full layer"):
    checkpoint.check_drafter_matches(ours_d.config, sliding_only)


def _drop(name):
  return lambda t: t.pop(name)


def _zero_ordering(t):
  t["masked_embedding.token_ordering"] = np.zeros_like(t["masked_embedding.token_ordering"])


def _dup_ordering(t):
  t["masked_embedding.token_ordering"][5] = t["masked_embedding.token_ordering"][7]


@pytest.mark.parametrize("kind, edit, message", [
    ("dense", _drop("model.layers.2.self_attn.q_proj.weight"),
     "missing tensors 'model.layers.2.self_attn.q_proj.weight'"),
    ("centroid", _drop("masked_embedding.centroids.weight"),
     "missing tensors 'masked_embedding.centroids.weight'"),
    ("dense", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32),
                                                                                    np.float32)}),
     "unexpected tensors 'model.layers.0.self_attn.k_proj.weight'"),
    ("dense", lambda t: t.update({"post_projection.weight": np.zeros((64, 16), np.float32)}),
     r"'post_projection.weight' has shape \(64, 16\), expected \(64, 32\)"),
    ("centroid", _zero_ordering, r"not a permutation of range\(256\): value 0 appears 256 times "
     r"\(all zeros"),
    ("centroid", _dup_ordering, r"not a permutation of range\(256\): value \d+ appears 2 times"),
    ("centroid", lambda t: t.update({"masked_embedding.token_ordering": np.arange(256.0)}),
     "token_ordering' has dtype float64, expected an integer type"),
    ("dense", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}),
     "lm_head.weight differs from embed_tokens.weight"),
])
def test_load_drafter_tensor_errors(pairs, tmp_path, kind, edit, message):
  d, _, _, ours_t, _ = pairs[kind]
  bad = edited_copy(d / "assistant", tmp_path / "bad", tensors=edit)
  with pytest.raises(ValueError, match=message):
    gemma_mtp.load_drafter(bad, ours_t)


def test_tied_lm_head_is_skipped(pairs, tmp_path):
  d, _, _, ours_t, ours_d = pairs["dense"]
  tied = edited_copy(d / "assistant", tmp_path / "tied", tensors=lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  params, report = checkpoint.load_hf_drafter_params(tied, ours_d.config)
  assert report["skipped"]["tied_lm_head"] == ["lm_head.weight"]
  assert_trees_equal(params, ours_d.params)


# ---- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", hf_assist.KINDS)
def test_hf_round_trip(pairs, tmp_path, kind):
  """ours -> HF directory -> transformers loads it with the same weights -> ours again."""
  _, _, assistant, ours_t, ours_d = pairs[kind]
  out = checkpoint.save_hf_drafter(tmp_path / "hf", ours_d.params, ours_d.config)
  with pytest.raises(FileExistsError):
    checkpoint.save_hf_drafter(out, ours_d.params, ours_d.config)
  reloaded, info = transformers.Gemma4AssistantForCausalLM.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ref_cfg, new_cfg = assistant.config, reloaded.config
  for key in ("backbone_hidden_size", "use_ordered_embeddings", "centroid_intermediate_top_k"):
    assert getattr(new_cfg, key) == getattr(ref_cfg, key), key
  for key in ("hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
              "intermediate_size", "sliding_window",
              "num_kv_shared_layers", "rope_parameters", "vocab_size", "rms_norm_eps",
              "hidden_size_per_layer_input", "vocab_size_per_layer_input"):
    assert getattr(new_cfg.text_config, key) == getattr(ref_cfg.text_config, key), key
  for i in range(4):  # per-layer head dims and KV heads (the tap layers')
    for key in ("head_dim", "num_key_value_heads"):
      assert (getattr(new_cfg.text_config.per_layer_config[i], key)
              == getattr(ref_cfg.text_config.per_layer_config[i], key)), (i, key)
  ref_state, new_state = hf_state(assistant), hf_state(reloaded)
  assert ref_state.keys() == new_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(new_state[name], ref_state[name], err_msg=name)
  # The reloaded model has the per-layer attention shapes of the original.
  for a, b in zip(reloaded.model.layers, assistant.model.layers):
    assert a.self_attn.num_key_value_groups == b.self_attn.num_key_value_groups
  again = gemma_mtp.load_drafter(out, ours_t)
  assert again.config == ours_d.config
  assert_trees_equal(again.params, ours_d.params)


def test_orbax_round_trip_and_kind_errors(pairs, tmp_path):
  d, _, _, ours_t, ours_d = pairs["centroid"]
  path = tmp_path / "drafter"
  checkpoint.save_drafter(path, ours_d.params, ours_d.config, step=3)
  assert checkpoint.is_orbax_dir(path)
  dcfg, params = checkpoint.load_drafter_params(path)
  assert dcfg == ours_d.config
  assert_trees_equal(params, ours_d.params)
  again = gemma_mtp.load_drafter(path, ours_t, convention="clean")
  assert again.config == ours_d.config.replace(convention="clean")
  assert_trees_equal(again.params, ours_d.params)

  # Overwrite keeps the directory loadable; a failed save leaves the previous one intact.
  newer = jax.tree_util.tree_map(
      lambda w: w * 2 if jnp.issubdtype(w.dtype, jnp.floating) else w, ours_d.params)
  checkpoint.save_drafter(path, newer, ours_d.config)
  assert_trees_equal(checkpoint.load_drafter_params(path)[1], newer)
  bad = dict(newer, final_norm=jnp.ones((7,)))
  with pytest.raises(ValueError, match=r"'final_norm' has shape \(7,\), expected \(32,\)"):
    checkpoint.save_drafter(path, bad, ours_d.config)
  assert_trees_equal(checkpoint.load_drafter_params(path)[1], newer)

  # A target checkpoint is not a drafter and vice versa.
  target_path = tmp_path / "target"
  checkpoint.save_params(target_path, ours_t.params, ours_t.config)
  with pytest.raises(ValueError, match="holds a target model"):
    checkpoint.load_drafter_params(target_path)
  with pytest.raises(ValueError, match="holds a target model"):
    gemma_mtp.load_drafter(target_path, ours_t)
  with pytest.raises(ValueError, match="format 'gemma_mtp.drafter'"):
    gemma_mtp.load_target(path)
  with pytest.raises(ValueError, match="'gemma4_text' is not a Gemma 4 drafter"):
    gemma_mtp.load_drafter(d / "target", ours_t)
  with pytest.raises(FileExistsError, match="not a gemma_mtp checkpoint"):
    checkpoint.save_drafter(d / "assistant", ours_d.params, ours_d.config)  # HF dir: not ours
  with pytest.raises(FileExistsError, match="holds a target model checkpoint"):
    checkpoint.save_drafter(target_path, ours_d.params, ours_d.config)


@pytest.mark.parametrize("num_centroids", [0, 16])
def test_random_drafter_runs(pairs, num_centroids):
  _, _, _, ours_t, _ = pairs["centroid"]
  dr = gemma_mtp.random_drafter(ours_t, embed_dim=16, num_heads=4, mlp_dim=32,
                                num_centroids=num_centroids, centroid_top_k=2, seed=3)
  order = np.asarray(dr.params.get("token_ordering", np.arange(256)))
  assert sorted(order.tolist()) == list(range(256))
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
  fwd = jax.jit(model_lib.forward, static_argnames="config")(ours_t.params, tokens,
                                                             config=ours_t.config)
  one = lambda v: jnp.full((1,), v, jnp.int32)  # noqa: E731
  masks, query = drafter_lib.tap_masks(fwd.taps, convention=dr.config.convention,
                                       window=dr.config.sliding_window, start=one(0),
                                       last_idx=one(6), call_start=one(0), call_end=one(5))
  step = jax.jit(drafter_lib.step, static_argnames=("cfg", "target_config"))
  logits, h = step(dr.params, dr.config, target_params=ours_t.params, target_config=ours_t.config,
                   token=one(11), hidden=fwd.hidden[:, -1], query_pos=query, taps=fwd.taps,
                   masks=masks)
  assert logits.shape == (1, 256) and h.shape == (1, 64)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_greedy_candidate_argmax_is_the_full_rows_argmax(monkeypatch):
  """`drafter.head_argmax` (greedy drafting without the centroid head's full logits row) picks
  `sampling.greedy(drafter.head(...))`: on random states, and where the best candidate ties with
  other candidates (equal embedding rows; the lowest token id wins, wherever the candidates list
  it) and with a non-candidate. The speculative loop's greedy drafts through it are checked
  against `transformers` round by round in test_speculative_hf (the centroid pair)."""
  from gemma_mtp import sampling  # pylint: disable=g-import-not-at-top
  cfg = drafter_lib.DrafterConfig(
      target_embed_dim=32, embed_dim=16, vocab_size=512, layer_types=("full",), num_heads=2,
      num_kv_heads=1, num_global_kv_heads=1, mlp_dim=32, sliding_window=8, head_dim=16,
      global_head_dim=16, num_centroids=32, centroid_top_k=4, dtype="float32",
      param_dtype="float32")
  params = drafter_lib.init_params(cfg, jax.random.PRNGKey(0))
  z = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
  ids, sel = (np.asarray(x) for x in drafter_lib._candidates(params, z, cfg))
  embed = np.asarray(params["embed"]).copy()
  best = ids[0, np.argmax(sel[0])]       # row 0's best candidate: its embedding row copied to
  others = ids[0][ids[0] != best]         # the lowest and highest other candidate ids of row 0
  outside = np.setdiff1d(np.arange(512), ids[0])[:1]     # and to a non-candidate (never chosen)
  embed[np.concatenate([[others.min(), others.max()], outside])] = embed[best]
  params = dict(params, embed=jnp.asarray(embed))
  ids, sel = (np.asarray(x) for x in drafter_lib._candidates(params, z, cfg))
  want = np.asarray(sampling.greedy(drafter_lib.head(params, z, cfg)))
  got = np.asarray(jax.jit(drafter_lib.head_argmax, static_argnames="cfg")(params, z, cfg))
  np.testing.assert_array_equal(got, want)
  tied = ids[0][sel[0] == sel[0].max()]
  assert len(tied) == 3 and got[0] == tied.min() == min(best, others.min())
  monkeypatch.setattr(drafter_lib, "GREEDY_CANDIDATES", False)
  np.testing.assert_array_equal(np.asarray(drafter_lib.head_argmax(params, z, cfg)), want)
