"""Sharding: the logical-axis table (in process) and sharded = single-device results on 8 fake
CPU devices and on two processes joined by jax.distributed (in subprocesses, see
tests/sharding_worker.py: this process has already initialised JAX with one device).

Tolerances. Forward logits and gradients are compared as max |sharded - single| / max(1, max
|single|) (float32 rounding scales with the values). The floor is not zero without any change of
arithmetic: the same one-device program at batch 1 and batch 8 differs by ~1.6e-6 of the logit
scale, and pure data parallelism over 8 devices (no reduction reordered) by up to ~6.5e-6, because
XLA CPU code differs with shapes. Tensor parallelism adds re-ordered reductions; measured maxima
are 5.1e-6 (8 devices) and 9.9e-6 (two processes of 4), and the bound is 2e-5 so that another CPU
or jax release does not flake. Loss and updated parameters of a training step agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from jax.sharding import PartitionSpec as P

from gemma_mtp import config as config_lib
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import kv_cache
from gemma_mtp import params as params_lib
from gemma_mtp import sharding
from tests import sharding_worker

REPO = pathlib.Path(__file__).resolve().parent.parent
FORWARD_TOL = 2e-5      # see the module docstring
GRAD_TOL = 5e-5
TRAIN_TOL = 1e-5        # loss and updated parameters
TIMEOUT = 900


# ---- subprocess runs (started together; they share the CPU) ---------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], log: pathlib.Path) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", *args], cwd=REPO,
                            env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: pathlib.Path, result: pathlib.Path) -> dict:
  try:
    proc.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  if proc.returncode != 0 or not result.exists():
    lines = [l for l in log.read_text().splitlines() if "SPMD" not in l and "Gloo" not in l]
    pytest.fail(f"{' '.join(proc.args[2:])} exited with {proc.returncode}:\n" +
                "\n".join(lines[-40:]))
  return json.loads(result.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{'meshes': record, 'processes': [record of process 0, of process 1], 'quant': record}."""
  meshes_dir = tmp_path_factory.mktemp("meshes")
  multi_dir = tmp_path_factory.mktemp("multiprocess")
  meshes = _start(["meshes", str(meshes_dir)], meshes_dir / "log")
  sharding_worker.make_checkpoints(multi_dir / "ckpt")
  port = str(_free_port())
  procs = [_start(["multiprocess", str(multi_dir), str(i), "2", port], multi_dir / f"log_{i}")
           for i in range(2)]
  out = {"processes": [_wait(p, multi_dir / f"log_{i}", multi_dir / f"result_{i}.json")
                       for i, p in enumerate(procs)]}
  quant_dir = tmp_path_factory.mktemp("quant")
  quant = _start(["quant", str(quant_dir)], quant_dir / "log")
  out["meshes"] = _wait(meshes, meshes_dir / "log", meshes_dir / "result.json")
  out["quant"] = _wait(quant, quant_dir / "log", quant_dir / "result.json")
  return out


@pytest.fixture(scope="module")
def meshes(runs):
  return runs["meshes"]


@pytest.mark.parametrize("name", sharding_worker.MESHES)
@pytest.mark.parametrize("cfg", ["ple", "moe"])
def test_forward_matches_single_device(meshes, cfg, name):
  rec = meshes[f"forward_{cfg}/{name}"]
  assert rec["err"] <= FORWARD_TOL, rec


@pytest.mark.parametrize("name", sharding_worker.MESHES)
def test_greedy_speculative_matches_single_device(meshes, name):
  assert meshes["speculative/one_device"]["equals_plain"]
  rec = meshes[f"speculative/{name}"]
  assert rec["tokens_equal"] and rec["rounds_equal"], rec
  # jit propagated the table's cache layout through prefill and the while_loop.
  assert rec["cache_sharding_as_table"], rec


def test_cache_layout(meshes):
  assert meshes["speculative/data=8"]["cache_k0_spec"] == str(P("data"))
  assert meshes["speculative/data=2,model=4"]["cache_k0_spec"] == str(P("data", None, "model"))
  assert meshes["speculative/model=8"]["cache_k0_spec"] == str(P())  # 4 kv heads: replicated


def test_plain_generate_matches_single_device(meshes):
  assert meshes["plain/data=2,model=4"]["tokens_equal"]


@pytest.mark.parametrize("name", sharding_worker.TRAIN_MESHES)
def test_train_step_matches_single_device(meshes, name):
  rec = meshes[f"train/{name}"]
  assert rec["loss_err"] <= TRAIN_TOL, rec
  assert rec["err"] <= TRAIN_TOL, rec
  assert rec["grad_err"] <= GRAD_TOL, rec
  assert rec["shardings_kept"], rec


def test_fsdp_shards_embed_dim(meshes):
  assert meshes["train/data=2,fsdp=2,model=2"]["gate_spec"] == str(P("fsdp", "model"))


def test_init_is_born_sharded(meshes):
  rec = meshes["init/data=2,model=4"]
  assert rec["err"] == 0.0 and rec["shardings_ok"], rec
  assert rec["q_shard"] == [64, 2, 16]   # [D, N / 4, H]


@pytest.mark.parametrize("fmt", ["hf", "orbax", "drafter_orbax"])
def test_load_sharded(meshes, fmt):
  rec = meshes[f"load/{fmt}"]
  assert rec["err"] == 0.0 and rec["cfg_equal"], rec
  assert rec.get("shardings_ok", True), rec


def test_two_processes(runs):
  for pid, rec in enumerate(runs["processes"]):
    assert rec["joined"] and rec["process_count"] == 2 and rec["device_count"] == 8, rec
    assert rec["local_device_count"] == 4, rec
    assert rec["mesh_processes"] == [[0] * 4, [1] * 4], rec   # data across, model within
    for fmt in ("hf", "orbax"):
      assert rec[f"load/{fmt}"] == {"err": 0.0, "addressable_shards": 4}, (pid, rec)
    assert rec["init"]["err"] == 0.0, rec
    assert rec["forward"]["err"] <= FORWARD_TOL, rec
    assert rec["train"]["loss_err"] <= TRAIN_TOL and rec["train"]["err"] <= TRAIN_TOL, rec


# ---- in process: the table, meshes, flags ----------------------------------------------------

def test_parse_mesh_shape():
  parse = sharding.parse_mesh_shape
  assert parse("data=2,model=4", num_devices=8) == {"data": 2, "fsdp": 1, "model": 4}
  assert parse({"model": -1}, num_devices=8) == {"data": 1, "fsdp": 1, "model": 8}
  assert parse(" fsdp = 2 , data=-1 ", num_devices=8) == {"data": 4, "fsdp": 2, "model": 1}
  assert parse(None, num_devices=4) == {"data": 4, "fsdp": 1, "model": 1}
  assert parse("", num_devices=1) == {"data": 1, "fsdp": 1, "model": 1}


@pytest.mark.parametrize("shape, message", [
    ("data=2,model=2", "needs 4 devices, 8 are available"),
    ("tensor=8", "unknown axis 'tensor'"),
    ("data=2;model=4", "cannot parse"),
    ("data=-1,model=-1", "one may be -1"),
    ("model=3,data=-1", "not a multiple of 3"),
    ("data=0", "sizes must be positive"),
    ("data=2,data=4", "given twice"),
])
def test_parse_mesh_shape_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_mesh_shape(shape, num_devices=8)


MESH_2x4 = {"data": 2, "fsdp": 1, "model": 4}


def test_int8_params_on_8_devices(runs):
  """int8 weights (quant.py) placed by param_shardings(quantized_specs) on (data, model) = (2, 4):
  logits equal one device's, scales follow their weights' output axes, a quantized Orbax
  checkpoint loads straight into the same layout."""
  res = runs["quant"]
  for cname in ("ple", "moe"):
    rec = res[f"forward_{cname}"]
    assert rec["err"] <= FORWARD_TOL and rec["int8"], rec
    assert rec["q_spec"] == "P(None, 'model')" == rec["q_scale_spec"], rec     # q [D, N, H]
    assert rec["o_spec"] == "P('model',)" and rec["o_scale_spec"] == "P()", rec  # o [N, H, D]
  rec = res["load_sharded"]
  assert rec["err"] == 0.0 and rec["same_layout"] and rec["quantized"]["embeddings"], rec


def test_partition_spec_rules():
  spec = sharding.partition_spec
  assert spec(("embed", "heads", "head_dim"), (64, 8, 16), MESH_2x4) == P(None, "model")
  # kv_heads = 1 (E2B) or 2 cannot be split 4 ways: replicated.
  assert spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), MESH_2x4) == P()
  assert spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), MESH_2x4) == P()
  # A mesh axis is used once per array: experts take `model`, the expert width does not.
  assert spec(("experts", "embed", "expert_mlp"), (8, 64, 64), MESH_2x4) == P("model")
  # ... unless the experts cannot be split, then the expert width takes it.
  assert spec(("experts", "embed", "expert_mlp"), (2, 64, 64), MESH_2x4) == P(None, None, "model")
  # batch over (data, fsdp): as many of them as divide the rows.
  fsdp = {"data": 2, "fsdp": 4, "model": 1}
  assert spec(("batch", None), (16, 3), fsdp) == P(("data", "fsdp"))
  assert spec(("batch", None), (2, 3), fsdp) == P("data")
  assert spec(("batch", None), (3, 3), fsdp) == P()
  assert spec(("vocab", "embed"), (256, 64), fsdp) == P(None, "fsdp")
  assert spec((None, "layers"), (3, 4), MESH_2x4) == P()


def test_partition_spec_errors():
  with pytest.raises(ValueError, match="logical axis 'nonsense' has no sharding rule"):
    sharding.partition_spec(("nonsense",), (4,), MESH_2x4)
  with pytest.raises(ValueError, match="differ in rank"):
    sharding.partition_spec(("embed",), (4, 4), MESH_2x4)
  with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
    sharding.partition_spec(("heads",), (8,), MESH_2x4, rules={"heads": ("tensor",)})


def _per_device_bytes(specs, cfg, mesh) -> tuple[int, int]:
  total = per_device = 0
  for s in jax.tree_util.tree_leaves(specs, is_leaf=params_lib.is_spec):
    pspec = sharding.partition_spec(s.axes, s.shape, mesh)
    split = 1
    for entry in pspec:
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        split *= mesh[axis] if axis else 1
    nbytes = s.size * params_lib.spec_dtype(s, cfg).itemsize
    total += nbytes
    per_device += nbytes // split
  return total, per_device


@pytest.mark.parametrize("preset, tp, max_fraction", [
    ("gemma4_31b", 2, 0.501),
    ("gemma4_31b", 8, 0.13),       # the 4 full-layer KV heads cannot be split 8 ways
    ("gemma4_26b_a4b", 8, 0.127),
    ("gemma4_e2b", 4, 0.26),       # 1 KV head: K/V projections replicated
])
def test_real_sizes_are_split_by_tensor_parallelism(preset, tp, max_fraction):
  """Shapes only: every large weight of the released sizes is split over `model`."""
  cfg = config_lib.preset(preset)
  mesh = {"data": 1, "fsdp": 1, "model": tp}
  total, per_device = _per_device_bytes(params_lib.param_specs(cfg), cfg, mesh)
  assert per_device <= max_fraction * total, (per_device / total)


def test_drafter_specs_have_rules():
  dcfg = drafter_lib.gemma4_e2b_assistant()
  mesh = {"data": 1, "fsdp": 2, "model": 4}
  shardings = params_lib.map_specs(
      lambda s: sharding.partition_spec(s.axes, s.shape, mesh), drafter_lib.param_specs(dcfg))
  assert shardings["embed"] == P("model", "fsdp")
  assert shardings["centroids"] == P(None, "fsdp")
  assert shardings["pre_proj"] == P("fsdp")


def test_one_device_mesh_and_born_sharded_init():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == 1
  if hasattr(jax.sharding, "AxisType"):
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  cfg = config_lib.tiny(layer_types=config_lib.pattern(2, 2))
  key = jax.random.PRNGKey(0)
  got = sharding.init_params_sharded(cfg, key, mesh)
  want = jax.jit(lambda k: params_lib.init_params(cfg, k))(key)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  abstract = sharding.abstract_params_sharded(params_lib.param_specs(cfg), cfg, mesh)
  assert abstract["embed"].sharding == sharding.logical_sharding(("vocab", "embed"), (256, 64),
                                                                 mesh)


def test_cache_shardings_structure():
  cfg = config_lib.tiny(layer_types=config_lib.pattern(4, 2), num_kv_shared_layers=2)
  mesh = sharding.make_mesh()
  cache = kv_cache.init_cache(cfg, 2, 32)
  s = sharding.cache_shardings(cache, mesh)
  assert s.k[2] is None and s.v[3] is None and s.max_len == 32
  placed = sharding.shard_cache(cache, mesh)
  assert placed.k[0].sharding.is_equivalent_to(s.k[0], 4)
  constrained = jax.jit(lambda c: sharding.constrain_cache(c, mesh))(cache)
  np.testing.assert_array_equal(constrained.ring_idx, cache.ring_idx)


def test_shard_batch_keeps_values():
  mesh = sharding.make_mesh()
  tree = {"tokens": np.arange(12).reshape(3, 4), "step": np.int32(5)}
  out = sharding.shard_batch(tree, mesh)
  np.testing.assert_array_equal(out["tokens"], tree["tokens"])
  assert int(out["step"]) == 5


def test_load_sharded_rejects_other_directories(tmp_path):
  with pytest.raises(ValueError, match="neither a Hugging Face directory"):
    sharding.load_sharded(tmp_path, None, sharding.make_mesh())


def test_load_sharded_checks_the_config(tmp_path):
  from gemma_mtp import checkpoint
  cfg = config_lib.tiny()
  checkpoint.save_params(tmp_path / "ck", params_lib.init_params(cfg, jax.random.PRNGKey(0)),
                         cfg)
  with pytest.raises(ValueError, match="different architecture"):
    sharding.load_sharded(tmp_path / "ck", cfg.replace(sliding_window=4), sharding.make_mesh())
  as_bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  got_cfg, params = sharding.load_sharded(tmp_path / "ck", as_bf16, sharding.make_mesh())
  assert got_cfg == as_bf16 and params["embed"].dtype == jnp.bfloat16


def test_distributed_single_process_is_a_no_op():
  assert sharding.maybe_initialize_distributed() is False
  assert sharding.maybe_initialize_distributed(None, 1, 0) is False
  with pytest.raises(ValueError, match="needs coordinator_address, num_processes and process_id"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, None)
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, 2)


def test_define_distributed_flags():
  fv = flags.FlagValues()
  sharding.define_distributed_flags(fv)
  sharding.define_distributed_flags(fv)  # twice is fine
  fv(["prog", "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
      "--mesh=data=2,model=4"])
  assert (fv.coordinator_address, fv.num_processes, fv.process_id, fv.mesh) == (
      "10.0.0.1:1234", 2, 1, "data=2,model=4")
