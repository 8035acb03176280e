"""Tests of gemma_mtp.checkpoint: Hugging Face import/export, Orbax save/restore, param counts."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from tests import hf_models
from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import params as params_lib

PREFIXES = (checkpoint.TEXT_PREFIX, checkpoint.MULTIMODAL_PREFIX)


# ---- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """kind -> (directory, transformers model) for every tiny kind, built once."""
  root = tmp_path_factory.mktemp("hf")
  return {kind: (root / kind, hf_models.make_hf_target(kind, root / kind))
          for kind in hf_models.KINDS}


@pytest.fixture(scope="module")
def e2b(hf_dirs):
  """(dir, cfg, params, hf model) of the e2b_like model."""
  directory, model = hf_dirs["e2b_like"]
  cfg = checkpoint.read_hf_config(directory)
  params, _ = checkpoint.load_hf_params(directory, cfg)
  return directory, cfg, params, model


def flat_params(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in checkpoint._flat(tree).items()}


def assert_trees_equal(a, b):
  fa, fb = flat_params(a), flat_params(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def assert_matches_hf(params, cfg, state, prefix="model."):
  """Every tensor of ours, in HF layout, equals the HF model's."""
  flat = checkpoint._flat(params)
  for name, spec in checkpoint._flat_specs(cfg).items():
    ours = params_lib.to_hf(spec, np.asarray(flat[name], np.float32))
    np.testing.assert_array_equal(ours, state[prefix + spec.hf_key], err_msg=spec.hf_key)


def rewrite_dir(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies HF dir `src` to `dst` with `edit(tensors)` applied to its single safetensors file."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = safetensors.numpy.load_file(src / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


# ---- Hugging Face config ------------------------------------------------------------------------

EXPECTED = {
    "e2b_like": dict(per_layer_dim=8, per_layer_vocab_size=128, num_kv_shared_layers=5,
                     double_wide_mlp=True, k_eq_v=False, num_kv_heads=1, num_global_kv_heads=1,
                     layer_types=(("sliding",) * 4 + ("full",)) * 2),
    "31b_like": dict(k_eq_v=True, num_kv_heads=2, num_global_kv_heads=1, head_dim=16,
                     global_head_dim=32, per_layer_dim=0),
    "moe": dict(num_experts=8, num_experts_per_token=2, expert_dim=16, mlp_dim=48, k_eq_v=True),
    "pattern": dict(layer_types=("sliding",) * 5 + ("full", "full"), num_kv_heads=2,
                    num_global_kv_heads=2, sliding_window=8),
}


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_read_hf_config(hf_dirs, kind):
  cfg = checkpoint.read_hf_config(hf_dirs[kind][0])
  for field, value in EXPECTED[kind].items():
    assert getattr(cfg, field) == value, field
  assert cfg.final_logit_softcap == 30.0 and cfg.max_seq_len == 1024
  assert cfg.global_rotary_fraction == 0.25
  assert (cfg.param_dtype, cfg.dtype) == ("float32", "float32")
  assert checkpoint.read_hf_config(hf_dirs[kind][0], param_dtype="bfloat16").dtype == "bfloat16"


def test_read_published_style_config(tmp_path):
  """Top-level global_head_dim / num_global_key_value_heads, null PLE, expert_intermediate_size."""
  text = checkpoint.hf_text_config(config_lib.gemma4_26b_a4b())
  del text["per_layer_config"], text["moe_intermediate_size"], text["dtype"]
  text.update(global_head_dim=512, num_global_key_value_heads=2, expert_intermediate_size=704,
              hidden_size_per_layer_input=None, torch_dtype="bfloat16")
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "gemma4", "text_config": text, "vision_config": {}}))
  assert checkpoint.read_hf_config(tmp_path) == config_lib.gemma4_26b_a4b()

  # Without attention_k_eq_v, num_global_key_value_heads does not apply (E2B publishes null).
  text = checkpoint.hf_text_config(config_lib.gemma4_e2b())
  del text["per_layer_config"]
  text.update(global_head_dim=512, num_global_key_value_heads=7, model_type="gemma4_text")
  (tmp_path / "config.json").write_text(json.dumps(text))
  assert checkpoint.read_hf_config(tmp_path) == config_lib.gemma4_e2b()


@pytest.mark.parametrize("preset",
                         ["gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b", "tiny"])
def test_hf_config_round_trip(tmp_path, preset):
  cfg = config_lib.preset(preset)
  (tmp_path / "config.json").write_text(json.dumps(checkpoint.hf_text_config(cfg)))
  assert checkpoint.read_hf_config(tmp_path) == cfg


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="gemma3_text"), "'gemma3_text' is not a Gemma 4 text model"),
    (dict(model_type="gemma4_assistant"), "'gemma4_assistant'"),
    (dict(use_bidirectional_attention="all"), "use_bidirectional_attention='all'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_activation="silu"), "'silu'"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0}}),
     "'yarn'"),
    (dict(dtype="float16"), "'float16'"),
])
def test_read_hf_config_errors(hf_dirs, tmp_path, edit, message):
  c = json.loads((hf_dirs["pattern"][0] / "config.json").read_text())
  c.update(edit)
  (tmp_path / "config.json").write_text(json.dumps(c))
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    checkpoint.read_hf_config(tmp_path)


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoint.read_hf_config(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoint.load_hf_params(tmp_path / "nowhere", config_lib.tiny())
  with pytest.raises(FileNotFoundError, match="no config.json"):
    checkpoint.read_hf_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    checkpoint.load_hf_params(tmp_path, config_lib.tiny())
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    checkpoint.read_hf_config(tmp_path)


# ---- Hugging Face tensors -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_hf_round_trip(hf_dirs, tmp_path, kind):
  """HF file -> ours (equal to the HF model's tensors) -> HF file (tensor for tensor identical)."""
  directory, model = hf_dirs[kind]
  cfg = checkpoint.read_hf_config(directory)
  params, report = checkpoint.load_hf_params(directory, cfg)
  assert report["prefix"] == "model."
  assert report["counts"]["loaded"] == len(jax.tree_util.tree_leaves(params))
  assert not any(report["skipped"].values())
  assert_matches_hf(params, cfg, hf_state(model))

  checkpoint.save_hf(tmp_path / "out", params, cfg)
  original = safetensors.numpy.load_file(directory / "model.safetensors")
  written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
  assert written.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(written[key], original[key], err_msg=key)
  assert checkpoint.read_hf_config(tmp_path / "out") == cfg


def test_sharded_load(e2b, tmp_path):
  _, cfg, params, _ = e2b
  out = checkpoint.save_hf(tmp_path / "sharded", params, cfg, max_shard_bytes=64 * 1024)
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  loaded, report = checkpoint.load_hf_params(out, cfg)
  assert report["files"] == shards
  assert_trees_equal(loaded, params)

  # An index that names a tensor its shard does not hold.
  index["weight_map"]["model.norm.weight"] = shards[0] if index["weight_map"][
      "model.norm.weight"] != shards[0] else shards[1]
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="'model.norm.weight' is listed in"):
    checkpoint.load_hf_params(out, cfg)


def test_multimodal_layout_skips_towers_and_reports(e2b, tmp_path, caplog):
  """model.language_model. prefix; vision/audio towers, tied lm_head, shared-layer K/V skipped."""
  _, cfg, params, _ = e2b
  rng = np.random.default_rng(0)
  embed = params_lib.to_hf(checkpoint._flat_specs(cfg)["embed"], np.asarray(params["embed"]))
  towers = {
      "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": rng.normal(size=(8, 8)),
      "model.vision_tower.patch_embedder.input_proj.weight": rng.normal(size=(8, 12)),
      "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": rng.normal(size=(4, 8)),
      "model.embed_vision.embedding_projection.weight": rng.normal(size=(32, 8)),
      "model.embed_audio.embedding_projection.weight": rng.normal(size=(32, 8)),
  }
  shared = {}
  for i in range(cfg.first_shared_layer, cfg.num_layers):
    h, k = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    base = f"model.language_model.layers.{i}.self_attn."
    shared[base + "k_proj.weight"] = rng.normal(size=(k * h, cfg.embed_dim))
    shared[base + "v_proj.weight"] = rng.normal(size=(k * h, cfg.embed_dim))
    shared[base + "k_norm.weight"] = rng.normal(size=(h,))
  extra = {k: v.astype(np.float32) for k, v in {**towers, **shared}.items()}
  extra["lm_head.weight"] = embed
  out = checkpoint.save_hf(tmp_path / "mm", params, cfg, prefix="model.language_model.",
                           extra_tensors=extra)
  c = json.loads((out / "config.json").read_text())
  assert c["model_type"] == "gemma4" and c["text_config"]["model_type"] == "gemma4_text"
  assert checkpoint.read_hf_config(out) == cfg

  with caplog.at_level(logging.INFO, logger="gemma_mtp.checkpoint"):
    loaded, report = checkpoint.load_hf_params(out, cfg)
  assert_trees_equal(loaded, params)
  assert report["prefix"] == "model.language_model."
  assert report["skipped"] == {"non_text": sorted(towers), "tied_lm_head": ["lm_head.weight"],
                               "kv_shared": sorted(shared)}
  assert report["counts"] == {"loaded": len(report["loaded"]), "non_text": 5, "tied_lm_head": 1,
                              "kv_shared": 15}
  assert "skipped 15 kv_shared tensors" in caplog.text
  assert "skipped 5 non_text tensors" in caplog.text

  # An untied head is not silently dropped.
  extra["lm_head.weight"] = embed + 1
  out = checkpoint.save_hf(tmp_path / "untied", params, cfg, prefix="model.language_model.",
                           extra_tensors=extra)
  with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens.weight"):
    checkpoint.load_hf_params(out, cfg)


def test_text_layout_tolerates_shared_kv_but_not_towers(e2b, tmp_path):
  _, cfg, params, _ = e2b
  h = cfg.layer_head_dim(9)
  out = checkpoint.save_hf(tmp_path / "a", params, cfg, extra_tensors={
      "model.layers.9.self_attn.k_norm.weight": np.ones(h, np.float32)})
  _, report = checkpoint.load_hf_params(out, cfg)
  assert report["skipped"]["kv_shared"] == ["model.layers.9.self_attn.k_norm.weight"]
  # In a text-only checkpoint a vision tower is not expected.
  out = checkpoint.save_hf(tmp_path / "b", params, cfg, extra_tensors={
      "model.vision_tower.x.weight": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors 'model.vision_tower.x.weight'"):
    checkpoint.load_hf_params(out, cfg)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_bf16_files(e2b, tmp_path, prefix):
  _, cfg, params, _ = e2b
  out = checkpoint.save_hf(tmp_path / "bf16", params, cfg, dtype="bfloat16", prefix=prefix)
  # The file is standard: safetensors/torch read it, with torch's own bf16 rounding.
  written = safetensors.torch.load_file(out / "model.safetensors")
  q = params_lib.to_hf(checkpoint._flat_specs(cfg)["layers.0.attn.q"],
                       params["layers"][0]["attn"]["q"])
  key = prefix + "layers.0.self_attn.q_proj.weight"
  assert written[key].dtype == torch.bfloat16
  torch.testing.assert_close(written[key], torch.from_numpy(np.array(q)).bfloat16(), rtol=0, atol=0)

  bcfg = checkpoint.read_hf_config(out)
  assert (bcfg.param_dtype, bcfg.dtype) == ("bfloat16", "bfloat16")
  loaded, _ = checkpoint.load_hf_params(out, bcfg)
  expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
  assert_trees_equal(loaded, expected)
  as_f32, _ = checkpoint.load_hf_params(out, bcfg, dtype="float32")
  assert_trees_equal(as_f32, jax.tree.map(lambda x: x.astype(np.float32), expected))


def test_place_is_applied_per_tensor(e2b):
  directory, cfg, params, _ = e2b
  seen = []

  def place(array, spec):
    seen.append(spec.hf_key)
    assert isinstance(array, np.ndarray) and array.shape == spec.shape
    return jax.device_put(array)

  loaded, _ = checkpoint.load_hf_params(directory, cfg, place=place)
  assert len(seen) == len(jax.tree_util.tree_leaves(params))
  assert_trees_equal(loaded, params)


def _drop(key):
  return lambda t: t.pop(key)


def _add(key, value):
  return lambda t: t.update({key: value})


def _reshape(key, shape):
  return lambda t: t.update({key: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("edit, message", [
    (_drop("model.layers.3.mlp.up_proj.weight"),
     "missing tensors 'model.layers.3.mlp.up_proj.weight'"),
    (_drop("model.layers.2.layer_scalar"), "missing tensors 'model.layers.2.layer_scalar'"),
    (_add("model.layers.0.self_attn.bogus.weight", np.zeros(2, np.float32)),
     "unexpected tensors 'model.layers.0.self_attn.bogus.weight'"),
    # k_proj of a layer that is not KV-shared is expected, but a v_norm weight never exists.
    (_add("model.layers.1.self_attn.v_norm.weight", np.zeros(16, np.float32)),
     "unexpected tensors 'model.layers.1.self_attn.v_norm.weight'"),
    (_add("model.layers.10.self_attn.k_proj.weight", np.zeros((16, 32), np.float32)),
     "unexpected tensors 'model.layers.10.self_attn.k_proj.weight'"),
    (_add("lm_head.weight", np.zeros((5, 32), np.float32)), "untied LM heads are not supported"),
    (_reshape("model.layers.4.self_attn.q_proj.weight", (64, 16)),
     r"'model.layers.4.self_attn.q_proj.weight' has shape \(64, 16\), expected \(128, 32\)"),
    (_reshape("model.embed_tokens_per_layer.weight", (128, 8)),
     r"'model.embed_tokens_per_layer.weight' has shape \(128, 8\), expected \(128, 80\)"),
    (_add("model.layers.0.mlp.up_proj.weight", np.zeros((64, 32), np.int32)),
     "expected a float type"),
])
def test_load_errors_name_the_tensor(e2b, tmp_path, edit, message):
  directory, cfg, _, _ = e2b
  bad = rewrite_dir(directory, tmp_path / "bad", edit)
  with pytest.raises(ValueError, match=message):
    checkpoint.load_hf_params(bad, cfg)


def test_truncated_or_foreign_safetensors(e2b, tmp_path):
  directory, cfg, _, _ = e2b
  bad = tmp_path / "trunc"
  shutil.copytree(directory, bad)
  file = bad / "model.safetensors"
  with open(file, "r+b") as f:
    f.truncate(file.stat().st_size - 100)
  with pytest.raises(ValueError, match="model.safetensors is truncated: tensor"):
    checkpoint.load_hf_params(bad, cfg)
  file.write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    checkpoint.load_hf_params(bad, cfg)
  safetensors.numpy.save_file({"transformer.h.0.w": np.zeros(2, np.float32)}, file)
  with pytest.raises(ValueError, match="no tensor under"):
    checkpoint.load_hf_params(bad, cfg)


def test_config_mismatch_is_reported(hf_dirs):
  directory, _ = hf_dirs["31b_like"]
  cfg = checkpoint.read_hf_config(directory).replace(k_eq_v=False)
  with pytest.raises(ValueError, match="missing tensors 'model.layers.5.self_attn.v_proj.weight'"):
    checkpoint.load_hf_params(directory, cfg)


# ---- transformers reads what we write -----------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(),  # full layers with fewer KV heads than sliding ones, without k_eq_v
    dict(per_layer_dim=8, per_layer_vocab_size=256, num_kv_shared_layers=2, double_wide_mlp=True),
    dict(num_experts=4, num_experts_per_token=2, expert_dim=8, k_eq_v=True),
], ids=["tiny", "ple_shared", "moe"])
def test_transformers_loads_save_hf(tmp_path, overrides):
  cfg = config_lib.tiny(**overrides)
  params = params_lib.init_params(cfg, jax.random.key(1))
  # Norms and scalars away from 1 so a misplaced one is visible.
  params = jax.tree.map(lambda x: x * 1.25 if x.ndim == 1 else x, params)
  out = checkpoint.save_hf(tmp_path / "hf", params, cfg)
  model, info = transformers.Gemma4ForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert model.config.attention_k_eq_v == cfg.k_eq_v
  state = hf_state(model)
  assert_matches_hf(params, cfg, state)
  assert state["model.layers.0.layer_scalar"].item() == 1.25


# ---- Orbax --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_params():
  cfg = config_lib.tiny(per_layer_dim=8, per_layer_vocab_size=256, num_experts=4,
                        num_experts_per_token=2, expert_dim=8, param_dtype="bfloat16")
  return cfg, params_lib.init_params(cfg, jax.random.key(0))


def test_orbax_round_trip(tiny_params, tmp_path):
  cfg, params = tiny_params
  path = tmp_path / "ckpt"
  checkpoint.save_params(path, params, cfg, step=7)
  assert checkpoint.is_orbax_dir(path) and not checkpoint.is_hf_dir(path)
  loaded_cfg, loaded = checkpoint.load_params(path)
  assert loaded_cfg == cfg
  assert checkpoint.checkpoint_step(path) == 7
  assert_trees_equal(loaded, params)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(loaded))
  assert_trees_equal(checkpoint.load_target(path)[1], params)

  # Restoring into given abstract shapes: dtype (and sharding) come from the target.
  target = params_lib.abstract_params(cfg.replace(param_dtype="float32"))
  _, as_f32 = checkpoint.load_params(path, target=target)
  assert_trees_equal(as_f32, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  bad = jax.tree.map(lambda x: x, target)
  bad["layers"][2]["mlp"]["up"] = jax.ShapeDtypeStruct((3, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"target: tensor 'layers.2.mlp.up' has shape \(3, 3\)"):
    checkpoint.load_params(path, target=bad)


def test_orbax_relative_paths(tiny_params, tmp_path, monkeypatch):
  # orbax-checkpoint 0.12 lost the metadata of checkpoints saved and read via relative paths.
  cfg, params = tiny_params
  monkeypatch.chdir(tmp_path)
  checkpoint.save_params("runs/x/target", params, cfg)
  assert_trees_equal(checkpoint.load_params("runs/x/target")[1], params)


def test_orbax_overwrite_and_failed_save_keeps_previous(tiny_params, tmp_path, monkeypatch):
  cfg, params = tiny_params
  path = tmp_path / "ckpt"
  checkpoint.save_params(path, params, cfg, step=1)
  newer = jax.tree.map(lambda x: x + 1, params)
  checkpoint.save_params(path, newer, cfg, step=2)
  assert checkpoint.checkpoint_step(path) == 2
  assert_trees_equal(checkpoint.load_params(path)[1], newer)

  real_write = checkpoint._write_orbax

  def write_then_crash(directory, tree):
    real_write(directory, tree)  # the arrays are fully written ...
    raise RuntimeError("disk full")  # ... but the save dies before it is committed

  monkeypatch.setattr(checkpoint, "_write_orbax", write_then_crash)
  with pytest.raises(RuntimeError, match="disk full"):
    checkpoint.save_params(path, jax.tree.map(lambda x: x * 0, params), cfg, step=3)

  def crash_midway(directory, tree):
    directory.mkdir()
    (directory / "_METADATA").write_text("{")
    raise OSError("killed")

  monkeypatch.setattr(checkpoint, "_write_orbax", crash_midway)
  with pytest.raises(OSError, match="killed"):
    checkpoint.save_params(path, params, cfg, step=4)

  assert checkpoint.checkpoint_step(path) == 2
  assert_trees_equal(checkpoint.load_params(path)[1], newer)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_orbax_refuses_foreign_dirs_and_bad_trees(tiny_params, tmp_path):
  cfg, params = tiny_params
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a gemma_mtp checkpoint"):
    checkpoint.save_params(tmp_path / "mine", params, cfg)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  bad = jax.tree.map(lambda x: x, params)
  del bad["layers"][1]["attn"]["k_norm"]
  with pytest.raises(ValueError, match="missing tensors 'layers.1.attn.k_norm'"):
    checkpoint.save_params(tmp_path / "x", bad, cfg)
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"] = jnp.ones(3)
  with pytest.raises(ValueError, match=r"'final_norm' has shape \(3,\), expected \(64,\)"):
    checkpoint.save_params(tmp_path / "x", bad, cfg)


def test_orbax_load_errors(tiny_params, tmp_path):
  cfg, params = tiny_params
  good = tmp_path / "good"
  checkpoint.save_params(good, params, cfg)

  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(tmp_path / "missing")

  def variant(name):
    path = tmp_path / name
    shutil.copytree(good, path)
    return path

  path = variant("no_config")
  (path / "model_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no model_config.json"):
    checkpoint.load_params(path)

  path = variant("corrupt_config")
  (path / "model_config.json").write_text('{"format": "gemma_mtp.params", "model_con')
  with pytest.raises(ValueError, match="model_config.json is not valid JSON"):
    checkpoint.load_params(path)

  path = variant("bad_field")
  meta = json.loads((path / "model_config.json").read_text())
  meta["model_config"]["num_wheels"] = 4
  (path / "model_config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['num_wheels'\]"):
    checkpoint.load_params(path)

  path = variant("other_config")
  meta = json.loads((path / "model_config.json").read_text())
  meta["model_config"]["mlp_dim"] = 96
  (path / "model_config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.down' has shape \(128, 64\) in the "
                                       r"checkpoint, the config expects \(96, 64\)"):
    checkpoint.load_params(path)

  path = variant("more_layers")
  meta = json.loads((path / "model_config.json").read_text())
  meta["model_config"]["layer_types"] += ["sliding", "full"]
  (path / "model_config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="'layers.6.attn.k'"):
    checkpoint.load_params(path)

  path = variant("no_params")
  shutil.rmtree(path / "params")
  with pytest.raises(FileNotFoundError, match="no params/"):
    checkpoint.load_params(path)

  path = variant("truncated")
  data = [f for f in (path / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data
  for f in data:
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)
  with pytest.raises(ValueError, match="is corrupt or truncated"):
    checkpoint.load_params(path)

  path = variant("no_metadata")
  (path / "params" / "_METADATA").unlink()
  with pytest.raises(ValueError, match="is corrupt or truncated"):
    checkpoint.load_params(path)

  # The good one is untouched by all of this.
  assert_trees_equal(checkpoint.load_params(good)[1], params)


def test_load_target_dispatch(e2b, tmp_path):
  directory, cfg, params, _ = e2b
  hf_cfg, hf_params = checkpoint.load_target(directory)
  assert hf_cfg == cfg
  assert checkpoint.is_hf_dir(directory) and not checkpoint.is_orbax_dir(directory)
  assert_trees_equal(hf_params, params)
  with pytest.raises(ValueError, match="neither a gemma_mtp Orbax checkpoint"):
    checkpoint.load_target(tmp_path)


# ---- parameter counts of the real sizes ---------------------------------------------------------

@pytest.mark.parametrize("preset", ["gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b"])
def test_param_count_matches_transformers(preset):
  cfg = config_lib.preset(preset)
  hf_cfg = transformers.Gemma4TextConfig.from_dict(checkpoint.hf_text_config(cfg))
  with torch.device("meta"):
    model = transformers.Gemma4ForCausalLM(hf_cfg)
  # The state dict holds parameters and persistent buffers (layer_scalar); lm_head.weight is tied.
  state = model.state_dict()
  hf_count = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
  assert params_lib.count_params(params_lib.param_specs(cfg)) == hf_count
  specs = checkpoint._flat_specs(cfg)
  assert {"model." + s.hf_key for s in specs.values()} == set(state) - {"lm_head.weight"}
  for s in specs.values():
    assert params_lib.to_hf_shape(s) == tuple(state["model." + s.hf_key].shape), s.hf_key
  if preset == "gemma4_31b":
    assert hf_count == 30_697_345_280 + 60
