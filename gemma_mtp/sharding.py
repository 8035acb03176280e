"""Sharding with `jax.sharding`: one code path from 1 device to many GPUs and hosts.

A mesh has three named axes, always in this order (outermost first):

  data   data parallelism: rows of a batch (prompts, training sequences) are split over it;
  fsdp   fully-sharded data parallelism: batch rows AND the `embed` dimension of the weights;
  model  tensor parallelism: heads, KV heads, MLP width, experts and vocabulary.

Axes of size 1 are kept, so the one table below (`LOGICAL_AXIS_RULES`, logical axis name ->
mesh axes) applies to every mesh; on one device every sharding is a replication and the code is
the single-device code. `model` is innermost, so tensor-parallel groups stay inside a host
(NVLink) and `data` spans hosts.

Every weight names its logical axes once (`params.ParamSpec.axes`); the KV cache, decode state
and batches use the names `batch` and `cache_seq`. A dimension whose size is not divisible by
its mesh axes falls back to fewer of them (ultimately replication), e.g. kv_heads = 1; a mesh
axis is used at most once per array (the first dimension that asks for it gets it).

The model and decoding loops carry no sharding code: `plain_generate`, `speculative_generate`
and train steps are `jax.jit` functions, and jit propagates the shardings of their arguments
(placed here) through the computation. The KV cache and the decode state are created inside
those functions; propagation gives them the table's layout (rows over `batch`, K/V heads over
`kv_heads`; tests/test_sharding.py checks it), and `constrain_cache` pins it where a caller wants
to be explicit. Typical use (any number of devices and hosts):

  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)          # multi-host only
  mesh = sharding.make_mesh("data=2,model=4")
  params = sharding.init_params_sharded(cfg, key, mesh)            # or load_sharded(path, ...)
  batch = sharding.shard_batch(decoding.make_prompt_batch(...), mesh)
  out = decoding.plain_generate(params, batch, rng, config=cfg, ...)

Multi-host (paste-ready summary): start the same program once per host (process) with
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (flags from
`define_distributed_flags`) and call `maybe_initialize_distributed` before any other JAX call;
it wires `jax.distributed.initialize`. The mesh then covers the devices of all hosts, weights are
created (`init_params_sharded`) or read (`load_sharded`: every host reads each tensor and places
only the shards its own devices hold) directly into their shards. `shard_batch` takes the same
global batch on every host (prompts), or with `process_local=True` each host's own rows (training
data loaders).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gemma_mtp import checkpoint
from gemma_mtp import drafter_kinds
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp.config import ModelConfig
from gemma_mtp.kv_cache import KVCache

log = logging.getLogger(__name__)

DATA = "data"
FSDP = "fsdp"
MODEL = "model"
MESH_AXES = (DATA, FSDP, MODEL)

# Logical axis name -> mesh axes it is split over (in order; () = replicated).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # activations, caches, batches
    "batch": (DATA, FSDP),      # rows: data parallelism (and FSDP's share of the batch)
    "seq": (),                  # token positions of a batch
    "cache_seq": (),            # KV-cache slots (full buffers and sliding rings)
    # weights (params.py, drafter.py)
    "vocab": (MODEL,),          # embedding / tied head rows, PLE rows, token ordering
    "embed": (FSDP,),           # model width D: sharded only for FSDP training
    "embed2": (FSDP,),          # drafter pre-projection input [2 Dt]
    "draft_embed": (FSDP,),     # drafter width Da
    "heads": (MODEL,),          # query heads: tensor parallelism
    "kv_heads": (MODEL,),       # KV heads (replicated when fewer than the model axis)
    "head_dim": (),
    "mlp": (MODEL,),            # GeGLU width: tensor parallelism
    "experts": (MODEL,),        # MoE experts: expert parallelism
    "expert_mlp": (MODEL,),     # expert width: takes `model` when the experts could not
    "per_layer": (),            # PLE width P
    "layers": (),               # PLE layer dimension
    "centroids": (),            # drafter centroid head rows
}

Rules = Mapping[str, Sequence[str]]


# ---- meshes ----------------------------------------------------------------------------------

def parse_mesh_shape(shape: str | Mapping[str, int] | None, *,
                     num_devices: int) -> dict[str, int]:
  """Sizes of (data, fsdp, model) from "data=2,model=4" or {"data": 2, "model": 4}.

  Missing axes have size 1; one axis may be -1 (all remaining devices); None or "" puts every
  device on `data`. The product must equal `num_devices`.
  """
  if shape is None or (isinstance(shape, str) and not shape.strip()):
    shape = {DATA: -1}
  if isinstance(shape, str):
    parsed = {}
    for part in shape.split(","):
      m = re.fullmatch(r"\s*(\w+)\s*[=:]\s*(-?\d+)\s*", part)
      if not m:
        raise ValueError(f"mesh shape {shape!r}: cannot parse {part!r}; expected e.g. "
                         "'data=2,model=4'")
      if m.group(1) in parsed:
        raise ValueError(f"mesh shape {shape!r}: axis {m.group(1)!r} given twice")
      parsed[m.group(1)] = int(m.group(2))
    shape = parsed
  unknown = [a for a in shape if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh shape {dict(shape)}: unknown axis {unknown[0]!r}; the axes are "
                     f"{MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  wild = [a for a, n in sizes.items() if n == -1]
  bad = [a for a, n in sizes.items() if n < 1 and n != -1]
  if bad or len(wild) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: sizes must be positive (one may be -1)")
  if wild:
    rest = math.prod(n for n in sizes.values() if n != -1)
    if num_devices % rest:
      raise ValueError(f"mesh shape {dict(shape)}: {num_devices} devices are not a multiple of "
                       f"{rest}")
    sizes[wild[0]] = num_devices // rest
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh shape {dict(shape)} needs {math.prod(sizes.values())} devices, "
                     f"{num_devices} are available")
  return sizes


def _auto_axis_types(n: int):
  """(AxisType.Auto,) * n, or None on jax versions without axis types."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  return None if axis_type is None else (axis_type.Auto,) * n


def make_mesh(shape: str | Mapping[str, int] | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, model) over `devices` (default: all devices of all hosts).

  Args:
    shape: axis sizes, see `parse_mesh_shape` ("data=2,model=4", {"model": -1}, None = all data).
    devices: the devices to use (e.g. `jax.devices()[:1]` for a one-device baseline).

  The axes are Auto (jit propagates shardings): recent `jax.make_mesh` defaults to Explicit axes,
  which would change how the model's ops are typed, so the type is passed deliberately.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_shape(shape, num_devices=len(devices))
  axis_shapes = tuple(sizes[a] for a in MESH_AXES)
  types = _auto_axis_types(len(MESH_AXES))
  try:
    if types is None:
      return jax.make_mesh(axis_shapes, MESH_AXES, devices=devices)
    return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=types, devices=devices)
  except (TypeError, ValueError, NotImplementedError):
    # Device sets make_mesh cannot lay out (e.g. a subset of a TPU slice): plain reshape.
    arr = np.asarray(devices, dtype=object).reshape(axis_shapes)
    if types is None:
      return jax.sharding.Mesh(arr, MESH_AXES)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=types)


def mesh_sizes(mesh) -> dict[str, int]:
  """{axis name: size} of a Mesh (or of a plain dict, returned as is)."""
  return dict(mesh.shape) if not isinstance(mesh, Mapping) else dict(mesh)


# ---- logical axes -> PartitionSpec -----------------------------------------------------------

def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, *,
                   rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """PartitionSpec of an array with logical `axes` and `shape` on `mesh` (a Mesh or size dict).

  Per dimension, the mesh axes of `rules[name]` are kept in order while their product divides the
  dimension; a mesh axis already used by an earlier dimension, or of size 1, is skipped.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} and shape {tuple(shape)} differ in rank")
  sizes = mesh_sizes(mesh)
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: "
                       f"{', '.join(sorted(rules))}")
    chosen, prod = [], 1
    for mesh_axis in rules[name]:
      if mesh_axis not in sizes:
        raise ValueError(f"rule {name!r} -> {tuple(rules[name])} names mesh axis {mesh_axis!r}, "
                         f"which the mesh {sizes} does not have")
      n = sizes[mesh_axis]
      if mesh_axis in used or n == 1:
        continue
      if dim % (prod * n):
        break
      chosen.append(mesh_axis)
      prod *= n
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                     *, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """NamedSharding of an array with logical `axes` and `shape` (see `partition_spec`)."""
  return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules=rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ---- parameters ------------------------------------------------------------------------------

def param_shardings(specs, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES):
  """NamedSharding tree (structure of `specs`, a ParamSpec tree) from each weight's axes.

  For int8 trees pass `quant.quantized_specs(cfg)`: a QArray's values are sharded by the weight's
  axes and its scales by the same axes minus the contracted ones (which have size 1), so a shard
  of the values finds its scales on its own device.
  """

  def one(s):
    if not quant.is_quantized(s):
      return logical_sharding(s.axes, s.shape, mesh, rules=rules)
    # The scales take the values' layout on the output axes (contracted axes have size 1).
    q = partition_spec(s.q.axes, s.q.shape, mesh, rules=rules)
    scale = [None if n == 1 else entry for n, entry in zip(s.scale.shape, q)]
    while scale and scale[-1] is None:
      scale.pop()
    return s.replace(q=NamedSharding(mesh, q), scale=NamedSharding(mesh, PartitionSpec(*scale)))

  return jax.tree_util.tree_map(one, specs,
                                is_leaf=lambda x: params_lib.is_spec(x) or quant.is_quantized(x))


def abstract_params_sharded(specs, cfg, mesh: jax.sharding.Mesh, *,
                            rules: Rules = LOGICAL_AXIS_RULES):
  """ShapeDtypeStruct tree with dtypes (`cfg.param_dtype` unless the spec says) and shardings.

  It is the `target` for `checkpoint.load_params` and for `jax.jit(...).lower(...)`.
  """
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, params_lib.spec_dtype(s, cfg), sharding=sh),
      specs, param_shardings(specs, mesh, rules=rules), is_leaf=params_lib.is_spec)


def shard_params(params, specs, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES):
  """Places (or re-shards) an existing parameter tree; every process must hold the same values."""
  return jax.device_put(params, param_shardings(specs, mesh, rules=rules))


def _init_sharded(init_fn: Callable, specs, key: jax.Array, mesh, rules):
  # One jitted program whose outputs are born sharded: each device computes only its shards
  # (random bits are counter based), so the full model never sits on one device.
  return jax.jit(init_fn, out_shardings=param_shardings(specs, mesh, rules=rules))(key)


def init_params_sharded(cfg: ModelConfig, key: jax.Array, mesh: jax.sharding.Mesh, *,
                        rules: Rules = LOGICAL_AXIS_RULES):
  """Random decoder parameters (the values of `params.init_params(cfg, key)`), born sharded."""
  return _init_sharded(lambda k: params_lib.init_params(cfg, k), params_lib.param_specs(cfg),
                       key, mesh, rules=rules)


def init_drafter_sharded(dcfg, key: jax.Array, mesh: jax.sharding.Mesh, *,
                         rules: Rules = LOGICAL_AXIS_RULES):
  """Random drafter parameters of any kind (the values of `drafter_kinds.init_params(dcfg, key)`),
  born sharded."""
  return _init_sharded(lambda k: drafter_kinds.init_params(dcfg, k),
                       drafter_kinds.param_specs(dcfg), key, mesh, rules=rules)


def shard_target(target, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES):
  """A copy of `target` (`api.Target` or any dataclass with .config and .params) re-sharded.

  Float or int8-quantized params (`quant.quantize_params`), in the checkpoint layout: the fused
  one (`model.fuse_projections`) would split q, k and v across devices unevenly.

  Raises:
    ValueError: the params are fused.
  """
  if params_lib.is_fused(target.params):
    raise ValueError("shard_target: the params are in the fused inference layout; shard "
                     "model.unfuse_projections(params, config) instead")
  specs = quant.specs_like(target.params, target.config)
  return dataclasses.replace(target, params=shard_params(target.params, specs, mesh, rules=rules))


def shard_drafter(drafter, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES):
  """A copy of `drafter` (`api.Drafter` or any dataclass with .config and .params) re-sharded."""
  specs = drafter_kinds.param_specs(drafter.config)
  return dataclasses.replace(drafter, params=shard_params(drafter.params, specs, mesh, rules=rules))


# ---- loading checkpoints into shards ---------------------------------------------------------

def _placer(mesh, rules):
  """place(array, spec) for the HF importers: every process places only its addressable shards."""

  def place(array: np.ndarray, spec: params_lib.ParamSpec) -> jax.Array:
    sharding = logical_sharding(spec.axes, array.shape, mesh, rules=rules)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  return place


def load_sharded(path, cfg: ModelConfig | None, mesh: jax.sharding.Mesh, *,
                 rules: Rules = LOGICAL_AXIS_RULES) -> tuple[ModelConfig, Any]:
  """Loads target weights directly into their shards: (cfg, params).

  Args:
    path: a Hugging Face directory (safetensors, read one tensor at a time; each process places
      only the shards of its own devices) or an Orbax directory written by
      `checkpoint.save_params` (restored straight into the sharded abstract tree; int8-quantized
      checkpoints come back quantized, scales sharded like their weights' output axes).
    cfg: the architecture and dtypes to load as; None reads it from the checkpoint. A given cfg
      must describe the stored architecture (dtypes may differ: arrays are cast on load).
    mesh: see `make_mesh`.

  Raises:
    ValueError: a directory in neither format, or a cfg that does not match the checkpoint.
  """
  path = pathlib.Path(path)
  if checkpoint.is_hf_dir(path):
    cfg = cfg or checkpoint.read_hf_config(path)
    params, _ = checkpoint.load_hf_params(path, cfg, place=_placer(mesh, rules=rules))
    return cfg, params
  if not checkpoint.is_orbax_dir(path):
    raise ValueError(f"{path} is neither a Hugging Face directory (config.json + safetensors) nor "
                     "a gemma_mtp Orbax checkpoint (model_config.json + params/)")
  chosen = {}
  quantization = checkpoint.stored_quantization(path)

  def target(saved_cfg: ModelConfig):
    # Called with the stored config before any array is read.
    use = cfg or saved_cfg
    if saved_cfg.replace(dtype=use.dtype, param_dtype=use.param_dtype) != use:
      raise ValueError(f"{path} holds a different architecture than the cfg passed to "
                       f"load_sharded: stored {saved_cfg}, given {use}")
    chosen["cfg"] = use
    specs = (params_lib.param_specs(use) if quantization is None else
             quant.quantized_specs(use, embeddings=quantization["embeddings"]))
    return abstract_params_sharded(specs, use, mesh, rules=rules)

  _, params = checkpoint.load_params(path, target=target)
  return chosen["cfg"], params


def load_drafter_sharded(path, target_cfg: ModelConfig, mesh: jax.sharding.Mesh, *,
                         convention: str | None = None, rules: Rules = LOGICAL_AXIS_RULES):
  """Loads a drafter for `target_cfg` directly into its shards: (DrafterConfig, params).

  HF directories are read one tensor at a time; Orbax drafters are restored into the sharded
  abstract tree. Checks and dtypes as `checkpoint.load_drafter` (the drafter must match the
  target and takes its dtypes).
  """
  path = pathlib.Path(path)
  if checkpoint.is_hf_dir(path):
    dcfg = checkpoint.read_hf_drafter_config(path, target_cfg, convention=convention or "hf")
    checkpoint.check_drafter_matches(dcfg, target_cfg)
    params, _ = checkpoint.load_hf_drafter_params(path, dcfg, place=_placer(mesh, rules=rules))
    return dcfg, params
  chosen = {}

  def target(saved):
    dcfg = saved if convention is None else checkpoint.with_convention(saved, convention,
                                                                        where=str(path))
    checkpoint.check_drafter_matches(dcfg, target_cfg)
    dcfg = dcfg.replace(dtype=target_cfg.dtype, param_dtype=target_cfg.param_dtype)
    chosen["cfg"] = dcfg
    return abstract_params_sharded(drafter_kinds.param_specs(dcfg), dcfg, mesh, rules=rules)

  _, params = checkpoint.load_drafter_params(path, target=target)
  return chosen["cfg"], params


# ---- caches, decode state, batches -----------------------------------------------------------

CACHE_KV_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, *,
                    rules: Rules = LOGICAL_AXIS_RULES):
  """KVCache-shaped tree of NamedSharding: rows over `batch`, K/V heads over `kv_heads`.

  k/v [B, S, K, H] -> (batch, cache_seq, kv_heads, head_dim); ring_idx [B, R], start and
  length [B] -> batch. A KV-shared layer's None entry stays None.
  """

  def kv(buf):
    return None if buf is None else logical_sharding(CACHE_KV_AXES, buf.shape, mesh, rules=rules)

  rows = lambda x: logical_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules=rules)
  return cache.replace(k=tuple(kv(b) for b in cache.k), v=tuple(kv(b) for b in cache.v),
                       ring_idx=rows(cache.ring_idx), start=rows(cache.start),
                       length=rows(cache.length))


def shard_cache(cache: KVCache, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES):
  """Places a cache (outside jit)."""
  return jax.device_put(cache, cache_shardings(cache, mesh, rules=rules))


def constrain_cache(cache: KVCache, mesh: jax.sharding.Mesh, *,
                    rules: Rules = LOGICAL_AXIS_RULES):
  """`with_sharding_constraint` of a cache inside jit (pins what propagation would choose)."""
  return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, rules=rules))


def batch_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh, *,
                   rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of an array whose leading dimension is batch rows (the rest replicated)."""
  return logical_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules=rules)


def shard_batch(tree, mesh: jax.sharding.Mesh, *, rules: Rules = LOGICAL_AXIS_RULES,
                process_local: bool = False):
  """Places a tree of batch-leading arrays (PromptBatch, training batch dict, ...) over `batch`.

  Args:
    tree: arrays whose leading dimension is rows (scalars are replicated).
    process_local: False: every process passes the same global batch (generation prompts); True:
      each process passes only its own rows and the global batch is their concatenation in
      process order (data loaders of multi-host training). Identical on one process.
  """

  def place(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, replicated(mesh))
    if process_local and jax.process_count() > 1:
      axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
      spec = PartitionSpec(axes or None, *(None,) * (x.ndim - 1))
      return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
    return jax.make_array_from_callback(x.shape, batch_sharding(x.shape, mesh, rules=rules),
                                        lambda index: x[index])

  return jax.tree_util.tree_map(place, tree)


# ---- multi-host ------------------------------------------------------------------------------

def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 local_device_ids: Sequence[int] | None = None) -> bool:
  """Calls `jax.distributed.initialize` for a multi-process run; a no-op for one process.

  Call it first, before any other JAX call. Returns True if this process joined a multi-process
  run. Every process runs the same program with the same coordinator address ("host:port" of
  process 0), num_processes and its own process_id in [0, num_processes).
  """
  if coordinator_address is None and num_processes in (None, 1) and process_id in (None, 0):
    return False
  if not coordinator_address or num_processes is None or process_id is None:
    raise ValueError("a multi-process run needs coordinator_address, num_processes and "
                     f"process_id; got {coordinator_address!r}, {num_processes!r}, "
                     f"{process_id!r}")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  if num_processes == 1:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  log.info("process %d of %d joined %s: %d local / %d global devices", jax.process_index(),
           jax.process_count(), coordinator_address, jax.local_device_count(), jax.device_count())
  return True


def define_distributed_flags(flag_values=None):
  """Defines --coordinator_address, --num_processes, --process_id and --mesh (absl).

  Binaries call this at import time and then, in main:
    sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    mesh = sharding.make_mesh(FLAGS.mesh)
  Flags already defined (e.g. by another module) are left alone.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  defs = [
      (flags.DEFINE_string, "coordinator_address", None,
       "host:port of process 0 for a multi-process (multi-host) run; unset: one process."),
      (flags.DEFINE_integer, "num_processes", None, "number of processes of a multi-process run."),
      (flags.DEFINE_integer, "process_id", None, "index of this process, in [0, num_processes)."),
      (flags.DEFINE_string, "mesh", "",
       "device mesh, e.g. 'data=2,model=4' (axes data, fsdp, model; one may be -1 = the rest; "
       "empty: all devices on data)."),
  ]
  for define, name, default, help_ in defs:
    if name not in fv:
      define(name, default, help_, flag_values=fv)


__all__ = [
    "DATA", "FSDP", "MODEL", "MESH_AXES", "LOGICAL_AXIS_RULES", "make_mesh", "parse_mesh_shape",
    "partition_spec", "logical_sharding", "param_shardings", "abstract_params_sharded",
    "shard_params", "init_params_sharded", "init_drafter_sharded", "shard_target",
    "shard_drafter", "load_sharded", "load_drafter_sharded", "cache_shardings", "shard_cache",
    "constrain_cache", "batch_sharding", "shard_batch", "maybe_initialize_distributed",
    "define_distributed_flags",
]
