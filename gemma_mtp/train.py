"""Training: the LM loss, AdamW, a generic resumable train loop, and the target / drafter recipes.

Parameters are trained as float32 master weights; the model casts them to `config.dtype` (bf16 on
accelerators) inside `forward`, so gradients and optimizer moments stay float32. Non-float leaves
(e.g. a drafter's int32 `token_ordering`) are carried through unchanged.

`fit(loss_fn, state, loader, ...)` takes any `loss_fn(params, batch, rng) -> (loss, metrics)`.
Arrays a loss needs besides the trained params (a frozen target) should be bound with
`jax.tree_util.Partial`, so they enter the jitted step as arguments, not as baked-in constants.

Checkpoints of a run (`<ckpt_dir>/step_<8 digits>/`):

  train_state.json   {"format": "gemma_mtp.train_state", "version": 1, "step", "opt_state_paths",
                      "metadata"}  (written last: a directory holding it is complete)
  state/             orbax tree {"step", "rng", "params", "opt_state": {"00000": leaf, ...}}

Each is written to a hidden sibling and renamed into place (`checkpoint._atomic_write_dir`), and old
ones are pruned only after a new one is complete, so a failed save never loses the last good one.
A resumed run restores step, params, optimizer state and RNG, and `Loader.batch_at(step)` replays
the same batches, so its losses equal those of an uninterrupted run bit for bit (on GPUs only with
`XLA_FLAGS=--xla_gpu_deterministic_ops=true`: XLA's GPU scatters and reductions are otherwise not
reproducible from run to run, resumed or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import data
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp.config import ModelConfig
from gemma_mtp.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]

STATE_FORMAT = "gemma_mtp.train_state"
STATE_VERSION = 1
STATE_META = "train_state.json"
STATE_TREE = "state"
_STEP_PREFIX = "step_"


# ================================================================================================
# Losses
# ================================================================================================

def lm_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None, *,
            config: ModelConfig) -> tuple[jax.Array, dict]:
  """Next-token cross entropy of packed sequences.

  Args:
    params: decoder parameters (any float dtype; the model computes in `config.dtype`).
    batch: {"tokens": [B, T + 1] int32, optional "mask": [B, T + 1] (1 = a real token)}; inputs
      are tokens[:, :-1], targets tokens[:, 1:], weighted by mask[:, 1:].
    rng: unused (the model has no dropout); part of the generic loss signature.
    config: the architecture (static).

  Returns:
    (mean loss over target tokens, {"accuracy": top-1 accuracy, "tokens": number of targets}),
    computed from float32 logits.
  """
  del rng
  tokens = batch["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = batch.get("mask")
  mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
  logits = model_lib.forward(params, inputs, config=config).logits   # [B, T, V] float32
  logz = jax.nn.logsumexp(logits, axis=-1)                            # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  count = mask.sum()
  denom = jnp.maximum(count, 1.0)
  loss = ((logz - target_logit) * mask).sum() / denom
  accuracy = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum() / denom
  return loss, {"accuracy": accuracy, "tokens": count}


# ================================================================================================
# Optimizer
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup and cosine decay, after global-norm clipping.

  Attributes:
    learning_rate: peak learning rate, reached after `warmup_steps`.
    warmup_steps: linear warmup from 0.
    total_steps: length of the schedule (warmup included); the rate ends at
      learning_rate * end_lr_fraction.
    end_lr_fraction: final / peak learning rate.
    weight_decay: decoupled decay, applied to matrices only (not norms, scalars, biases).
    b1, b2, eps: Adam moments.
    clip_norm: gradients are scaled to at most this global norm (0 disables clipping).
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 10_000
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps="
                       f"{self.warmup_steps}, total_steps={self.total_steps}")
    if self.learning_rate <= 0 or self.weight_decay < 0 or self.clip_norm < 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be > 0, weight_decay="
                       f"{self.weight_decay} and clip_norm={self.clip_norm} >= 0")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps, end_value=cfg.learning_rate * cfg.end_lr_fraction)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices and higher (not norms / scalars)."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip -> Adam -> decoupled weight decay (masked) -> -learning_rate(step).

  The same update as `optax.adamw`; the current rate is kept in the state (see `learning_rate`).
  Equal configs give the same transformation object, so compiled train steps are reused.
  """
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=make_schedule(cfg)),
  )


# ================================================================================================
# Train state and steps
# ================================================================================================

def _trainable(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _split(params: Any) -> tuple[Any, Any]:
  """(float leaves, other leaves), each with None in place of the other's leaves."""
  train = jax.tree_util.tree_map(lambda x: x if _trainable(x) else None, params)
  fixed = jax.tree_util.tree_map(lambda x: None if _trainable(x) else x, params)
  return train, fixed


def _merge(train: Any, fixed: Any) -> Any:
  return jax.tree_util.tree_map(lambda a, b: b if a is None else a, train, fixed,
                                is_leaf=lambda x: x is None)


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and saves in checkpoints).

  Attributes:
    step: [] int32, number of updates applied so far.
    params: the parameter tree; float leaves in float32.
    opt_state: state of `tx` over the float leaves of `params`.
    rng: [2] uint32 raw key, split once per step (one half for the step, one carried on).
    tx: the optimizer (static).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation, *, rng: jax.Array
             ) -> "TrainState":
    """A fresh state; float params are copied to float32 master weights (train steps donate
    the state, so the caller's arrays stay valid)."""
    params = jax.tree_util.tree_map(
        lambda x: jnp.array(x, jnp.float32) if _trainable(x) else jnp.array(x), params)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(_split(params)[0]),
               rng=jnp.asarray(rng), tx=tx)


def learning_rate(state: TrainState) -> float | None:
  """The rate of the last update (from `make_optimizer`'s state), or None for other optimizers."""
  nodes = jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), dict))
  for node in nodes:
    if isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams:
      return float(node.hyperparams["learning_rate"])
  return None


def _global_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclasses.dataclass(frozen=True)
class _Static:
  """The non-array part of a loss function pytree: a hashable static argument of the jitted steps.

  A plain callable (or `functools.partial`) is one static leaf; a `jax.tree_util.Partial` splits
  into its bound arrays (traced arguments) and everything else (configs, ints: static, compared by
  value).
  """

  treedef: Any
  leaves: tuple  # the static leaves, None where an array goes

  def build(self, arrays: Sequence[Any]) -> LossFn:
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(
        self.treedef, [next(it) if x is None else x for x in self.leaves])


def _split_loss(loss_fn: LossFn) -> tuple[list[Any], _Static]:
  leaves, treedef = jax.tree_util.tree_flatten(loss_fn)
  arrays = [x for x in leaves if _is_array(x)]
  static = _Static(treedef, tuple(None if _is_array(x) else x for x in leaves))
  try:
    hash(static)
  except TypeError as e:
    raise TypeError(f"loss_fn {loss_fn!r} binds an unhashable non-array value ({e}); bind only "
                    "arrays and hashable values (configs, numbers, strings)") from None
  return arrays, static


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(3,))
def _train_step(state: TrainState, batch: dict, loss_arrays: list, loss_static: _Static):
  loss_fn = loss_static.build(loss_arrays)
  rng, step_rng = jax.random.split(state.rng)
  train, fixed = _split(state.params)

  def loss_of(p):
    return loss_fn(_merge(p, fixed), batch, step_rng)

  (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(train)
  updates, opt_state = state.tx.update(grads, state.opt_state, train)
  train = optax.apply_updates(train, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}
  new = state.replace(step=state.step + 1, params=_merge(train, fixed), opt_state=opt_state,
                      rng=rng)
  return new, metrics


def train_step(state: TrainState, batch: dict, loss_fn: LossFn) -> tuple[TrainState, dict]:
  """One update (jitted; `state` is donated: do not use it afterwards).

  Returns:
    (new state, metrics of `loss_fn` plus "loss" and "grad_norm" (before clipping)).
  """
  return _train_step(state, batch, *_split_loss(loss_fn))


@functools.partial(jax.jit, static_argnums=(3,))
def _eval_step(params, batch, loss_arrays, loss_static, rng):
  loss, metrics = loss_static.build(loss_arrays)(params, batch, rng)
  return {**metrics, "loss": loss}


def budgeted_steps(loss_fn: LossFn, make_state: Callable[[int], TrainState], loader, *,
                   seconds: float, calib_steps: int = 20, max_steps: int = 1_000_000) -> int:
  """Steps that fit in `seconds`, from the time of `calib_steps` steps after compilation.

  `make_state(total_steps)` makes a fresh state whose schedule lasts `total_steps`; the
  calibration runs on one (its step compiles once more for the real schedule: the optimizer is a
  static part of the state).
  """
  state = make_state(100)
  state, _ = train_step(state, loader.batch_at(0), loss_fn)
  jax.block_until_ready(state.params)
  t0 = time.perf_counter()
  for i in range(1, calib_steps + 1):
    state, m = train_step(state, loader.batch_at(i), loss_fn)
  jax.block_until_ready(m)
  per_step = (time.perf_counter() - t0) / calib_steps
  steps = int(min(max_steps, max(calib_steps, seconds / per_step)))
  log.info("calibration: %.1f ms/step -> %d steps in %.0f s", per_step * 1e3, steps, seconds)
  return steps


def make_eval_fn(loss_fn: LossFn, batches: Sequence[dict], *, seed: int = 0
                 ) -> Callable[[Any], dict[str, float]]:
  """eval_fn(params) -> mean of "loss" and every metric of `loss_fn` over fixed `batches`."""
  loss_arrays, loss_static = _split_loss(loss_fn)
  batches = list(batches)
  if not batches:
    raise ValueError("make_eval_fn needs at least one batch")
  base = jax.random.PRNGKey(seed)

  def eval_fn(params) -> dict[str, float]:
    out = [_eval_step(params, b, loss_arrays, loss_static, jax.random.fold_in(base, i))
           for i, b in enumerate(batches)]
    out = jax.device_get(out)
    return {k: float(np.mean([o[k] for o in out])) for k in out[0]}

  return eval_fn


def export_params(state: TrainState | Any, *, dtype: str = "bfloat16") -> Any:
  """The parameters (of a state, or a tree) with float leaves cast to `dtype`, for shipping."""
  params = state.params if isinstance(state, TrainState) else state
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if _trainable(x) else x, params)


# ================================================================================================
# Checkpoints of the whole train state
# ================================================================================================

def _step_dir(ckpt_dir: pathlib.Path, step: int) -> pathlib.Path:
  return ckpt_dir / f"{_STEP_PREFIX}{step:08d}"


def checkpoint_steps(ckpt_dir: PathLike) -> list[int]:
  """Steps of the complete checkpoints in `ckpt_dir`, ascending ([] if there are none)."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  if not ckpt_dir.is_dir():
    return []
  steps = []
  for d in ckpt_dir.iterdir():
    name = d.name
    if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX):].isdigit() \
        and (d / STATE_META).is_file():
      steps.append(int(name[len(_STEP_PREFIX):]))
  return sorted(steps)


def latest_checkpoint(ckpt_dir: PathLike) -> pathlib.Path | None:
  """The newest complete checkpoint directory in `ckpt_dir`, or None."""
  steps = checkpoint_steps(ckpt_dir)
  return _step_dir(pathlib.Path(ckpt_dir), steps[-1]) if steps else None


def _opt_paths(opt_state) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def _state_tree(state: TrainState) -> dict:
  leaves = jax.tree_util.tree_leaves(state.opt_state)
  return {"step": state.step, "rng": state.rng, "params": state.params,
          "opt_state": {f"{i:05d}": x for i, x in enumerate(leaves)}}


@contextlib.contextmanager
def quiet_orbax():
  """Raises the absl logger to WARNING for the duration (orbax logs ~30 INFO lines per save)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))
  try:
    yield
  finally:
    logger.setLevel(level)


def _write_tree(directory: pathlib.Path, tree: Any):
  """Writes `tree` with orbax into `directory` (a seam for tests of failed saves)."""
  checkpoint._write_orbax(directory, tree)  # pylint: disable=protected-access


def save_state(ckpt_dir: PathLike, state: TrainState, *, keep: int = 2,
               metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Saves `state` as `<ckpt_dir>/step_<step>/` atomically; then keeps only the newest `keep`.

  Args:
    metadata: JSON-serializable facts stored with it (model config, tokenizer, ...).
  """
  if keep < 1:
    raise ValueError(f"keep={keep} must be >= 1")
  ckpt_dir = pathlib.Path(ckpt_dir)
  step = int(state.step)
  meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
          "opt_state_paths": _opt_paths(state.opt_state), "metadata": dict(metadata or {})}
  tree = _state_tree(state)

  def write(tmp: pathlib.Path):
    _write_tree(tmp / STATE_TREE, tree)
    with open(tmp / STATE_META, "w") as f:  # written last: the directory is complete
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())

  path = _step_dir(ckpt_dir, step)
  with quiet_orbax():
    checkpoint._atomic_write_dir(path, write)  # pylint: disable=protected-access
  for old in checkpoint_steps(ckpt_dir)[:-keep]:
    shutil.rmtree(_step_dir(ckpt_dir, old), ignore_errors=True)
  return path


def read_state_metadata(path: PathLike) -> dict[str, Any]:
  """The train_state.json of a checkpoint directory; errors name the directory."""
  path = pathlib.Path(path)
  file = path / STATE_META
  if not file.is_file():
    raise FileNotFoundError(f"{path} is not a complete train-state checkpoint (no {STATE_META})")
  meta = json.loads(file.read_text())
  if meta.get("format") != STATE_FORMAT:
    raise ValueError(f"{file} has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
  return meta


def restore_state(path: PathLike, state: TrainState) -> TrainState:
  """Restores a `save_state` checkpoint into the structure, dtypes and shardings of `state`.

  Raises:
    ValueError: the checkpoint was written for another model or optimizer (the first differing
      optimizer-state path or parameter is named), or is corrupt.
  """
  path = pathlib.Path(path)
  meta = read_state_metadata(path)
  expected = _opt_paths(state.opt_state)
  if meta["opt_state_paths"] != expected:
    diff = next((f"{a!r} != {b!r}" for a, b in zip(meta["opt_state_paths"], expected) if a != b),
                f"{len(meta['opt_state_paths'])} leaves != {len(expected)}")
    raise ValueError(f"{path}: optimizer state does not match this run's optimizer/model "
                     f"(saved vs expected: {diff})")

  def abstract(x):
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  target = jax.tree_util.tree_map(abstract, _state_tree(state))
  # Compare shapes and dtypes first: a clear error naming the array, and no half-run restore.
  saved = checkpoint._saved_arrays(path / STATE_TREE)  # pylint: disable=protected-access
  flat = checkpoint._flat(target)  # pylint: disable=protected-access
  for name, want in sorted(flat.items(), key=lambda kv: not kv[0].startswith("params.")):
    got = saved.get(name)
    if got is None:
      raise ValueError(f"{path}: the checkpoint has no array {name!r} (another model?)")
    if tuple(got.shape) != want.shape or jnp.dtype(got.dtype) != want.dtype:
      raise ValueError(f"{path}: array {name!r} is {jnp.dtype(got.dtype).name}{list(got.shape)} in "
                       f"the checkpoint, expected {want.dtype.name}{list(want.shape)} (another "
                       "model or optimizer?)")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore((path / STATE_TREE).absolute(), target)
  except Exception as e:  # orbax raises many types for damaged or mismatching directories
    raise ValueError(f"cannot restore train state from {path}: {str(e)[:500]}") from e
  opt_def = jax.tree_util.tree_structure(state.opt_state)
  opt_state = jax.tree_util.tree_unflatten(opt_def, [tree["opt_state"][k]
                                                     for k in sorted(tree["opt_state"])])
  restored = state.replace(step=tree["step"], rng=tree["rng"], params=tree["params"],
                           opt_state=opt_state)
  if int(restored.step) != meta["step"]:
    raise ValueError(f"{path}: stored step {int(restored.step)} != {meta['step']} in {STATE_META}")
  return restored


# ================================================================================================
# The loop
# ================================================================================================

def _num_tokens(batch: Mapping[str, Any]) -> int:
  tokens = batch.get("tokens")
  return 0 if tokens is None else int(np.prod(tokens.shape)) - tokens.shape[0]


def _fmt(record: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in record.items() if k not in ("step", "split"))


def fit(
    loss_fn: LossFn,
    state: TrainState,
    loader,
    *,
    steps: int,
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    ckpt_dir: PathLike | None = None,
    ckpt_every: int = 0,
    keep_checkpoints: int = 2,
    log_every: int = 10,
    metrics_file: PathLike | None = None,
    resume: bool = True,
    ckpt_metadata: Mapping[str, Any] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
  """Trains `state` until `state.step == steps`, resuming from `ckpt_dir` if it holds a checkpoint.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
    state: the initial state (consumed: its buffers are donated to the first step). When resuming
      it only supplies structure, dtypes and shardings.
    loader: anything with `batch_at(step) -> dict of arrays` (a pure function of step).
    steps: total number of steps of the run (not of this call).
    eval_fn: `eval_fn(params) -> metrics`, run every `eval_every` steps and at the end.
    ckpt_dir: where `save_state` checkpoints go (every `ckpt_every` steps and at the end).
    keep_checkpoints: complete checkpoints kept.
    log_every: a "train" record (means over the window, step_time_s, tokens_per_s, lr) is logged
      every this many steps.
    metrics_file: records are appended to it as JSON lines.
    resume: restore the latest checkpoint of `ckpt_dir` first.
    ckpt_metadata: stored in each checkpoint's train_state.json.

  Returns:
    (final state, the records of this call: {"step", "split": "train" | "eval", metrics...}).
  """
  if log_every < 1:
    raise ValueError(f"log_every={log_every} must be >= 1")
  loss_arrays, loss_static = _split_loss(loss_fn)
  ckpt_dir = pathlib.Path(ckpt_dir) if ckpt_dir is not None else None
  if ckpt_dir is not None and resume:
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
      state = restore_state(latest, state)
      log.info("resumed from %s (step %d)", latest, int(state.step))
  start = int(state.step)
  history: list[dict[str, Any]] = []
  if metrics_file is not None:
    pathlib.Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
  out = open(metrics_file, "a") if metrics_file is not None else None

  def emit(record: dict[str, Any]):
    history.append(record)
    log.info("step %d %s: %s", record["step"], record["split"], _fmt(record))
    if out is not None:
      out.write(json.dumps(record) + "\n")
      out.flush()

  try:
    if start >= steps:
      log.info("nothing to do: state is at step %d >= steps=%d", start, steps)
      return state, history
    log.info("training steps %d..%d", start + 1, steps)
    pending: list[dict] = []
    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    for step in range(start, steps):
      batch = loader.batch_at(step)
      state, metrics = _train_step(state, batch, loss_arrays, loss_static)
      pending.append(metrics)
      done = step + 1
      if step == start:  # the first step compiles: keep it out of the throughput numbers
        jax.block_until_ready(metrics)
        log.info("first step (with compilation) took %.2f s", time.perf_counter() - window_start)
        window_start = time.perf_counter()
      else:
        window_steps += 1
        window_tokens += _num_tokens(batch)
      if done % log_every == 0 or done == steps:
        host = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        record = {"step": done, "split": "train"}
        record.update({k: float(np.mean([m[k] for m in host])) for k in host[-1]})
        record["lr"] = learning_rate(state)
        if window_steps:
          record["step_time_s"] = elapsed / window_steps
          record["tokens_per_s"] = window_tokens / elapsed
        emit(record)
        pending = []
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
      paused = False
      if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
        emit({"step": done, "split": "eval", **eval_fn(state.params)})
        paused = True
      if ckpt_dir is not None and ((ckpt_every and done % ckpt_every == 0) or done == steps):
        t = time.perf_counter()
        path = save_state(ckpt_dir, state, keep=keep_checkpoints, metadata=ckpt_metadata)
        log.info("saved %s in %.1f s", path, time.perf_counter() - t)
        paused = True
      if paused:  # evaluation and saving are not training time
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    return state, history
  finally:
    if out is not None:
      out.close()


# ================================================================================================
# Recipes (what experiments/train_target.py and train_drafter.py run)
# ================================================================================================

def _full_every(cfg: ModelConfig) -> int:
  return cfg.layer_types.index(config_lib.FULL) + 1


def target_config(model: str | ModelConfig, *, vocab_size: int, compute_dtype: str = "bfloat16",
                  overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """A trainable target config: a preset (or config) with float32 params and `overrides`.

  Args:
    model: preset name (`config.PRESETS`) or a ModelConfig.
    vocab_size: the tokenizer's vocabulary size.
    compute_dtype: activation dtype ('bfloat16' / 'float32').
    overrides: ModelConfig fields, plus `num_layers` and `full_every` (every n-th layer is a full
      attention layer, the last always is) which rebuild `layer_types`.
  """
  cfg = config_lib.preset(model) if isinstance(model, str) else model
  over = dict(overrides or {})
  num_layers, full_every = over.pop("num_layers", None), over.pop("full_every", None)
  if num_layers is not None or full_every is not None:
    over["layer_types"] = config_lib.pattern(num_layers or cfg.num_layers,
                                             full_every or _full_every(cfg))
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(over) - fields)
  if unknown:
    raise ValueError(f"unknown model fields {unknown}; expected ModelConfig fields, num_layers "
                     "or full_every")
  over.setdefault("vocab_size", vocab_size)
  if over["vocab_size"] < vocab_size:
    raise ValueError(f"model vocab_size={over['vocab_size']} is smaller than the tokenizer's "
                     f"{vocab_size}")
  return cfg.replace(dtype=compute_dtype, param_dtype="float32", **over)


def _eval_fn(corpus_dir, tok, loss_fn, *, seq_len, batch_size, eval_batches):
  """Evaluation over the first batches of the eval split (None if it is too small or unwanted)."""
  if eval_batches < 1:
    return None
  try:
    loader = data.make_loader(corpus_dir, "eval", tok, seq_len=seq_len, batch_size=batch_size,
                              shuffle=False)
  except ValueError as e:
    log.warning("no evaluation: %s", e)
    return None
  n = min(eval_batches, max(1, loader.num_sequences // batch_size))
  return make_eval_fn(loss_fn, [loader.batch_at(i) for i in range(n)])


def _write_run_json(workdir: pathlib.Path, run: Mapping[str, Any]):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")


def _fit_and_export(loss_fn: LossFn, init_params: Callable[[jax.Array], Any], *, kind: str,
                    save: Callable[..., None], cfg: Any, corpus_dir: PathLike, tok: Tokenizer,
                    workdir: pathlib.Path, optimizer: OptimizerConfig, seq_len: int,
                    batch_size: int, steps: int, seed: int, log_every: int, eval_every: int,
                    eval_batches: int, ckpt_every: int, keep_checkpoints: int, resume: bool,
                    export_dtype: str, ckpt_metadata: Mapping[str, Any],
                    seconds: float = 0.0) -> TrainState:
  """The loop shared by the recipes: trains (or resumes) and exports to `<workdir>/<kind>`.

  `init_params(key)` makes fresh parameters; `save(out, params, cfg, step=...)` writes the export
  (`checkpoint.save_params` or `save_drafter`) with `cfg` in `export_dtype`. With `seconds` > 0 the
  run (and the optimizer's schedule) lasts as many steps as fit in `seconds` (`budgeted_steps`),
  at most `steps`.
  """
  loader = data.make_loader(corpus_dir, "train", tok, seq_len=seq_len, batch_size=batch_size,
                            seed=seed)
  eval_fn = _eval_fn(corpus_dir, tok, loss_fn, seq_len=seq_len, batch_size=batch_size,
                     eval_batches=eval_batches)
  k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))

  def make_state(total: int) -> TrainState:
    opt = dataclasses.replace(optimizer, total_steps=total,
                              warmup_steps=min(optimizer.warmup_steps, total - 1))
    # A copy of the key: train steps donate the state's buffers.
    return TrainState.create(init_params(k_init), make_optimizer(opt), rng=jnp.array(k_train))

  if seconds > 0:
    steps = budgeted_steps(loss_fn, make_state, loader, seconds=seconds, max_steps=steps)
    optimizer = dataclasses.replace(optimizer, total_steps=steps,
                                    warmup_steps=min(optimizer.warmup_steps, steps - 1))
  state = TrainState.create(init_params(k_init), make_optimizer(optimizer), rng=k_train)
  state, _ = fit(loss_fn, state, loader, steps=steps, eval_fn=eval_fn, eval_every=eval_every,
                 ckpt_dir=workdir / "checkpoints", ckpt_every=ckpt_every,
                 keep_checkpoints=keep_checkpoints, log_every=log_every,
                 metrics_file=workdir / "metrics.jsonl", resume=resume,
                 ckpt_metadata=ckpt_metadata)
  out = workdir / kind
  with quiet_orbax():
    save(out, export_params(state, dtype=export_dtype), cfg.replace(param_dtype=export_dtype),
         step=int(state.step))
  log.info("exported the %s (%s) to %s", kind, export_dtype, out)
  return state


def train_target(
    *,
    corpus_dir: PathLike,
    tokenizer_path: PathLike,
    workdir: PathLike,
    model: str | ModelConfig = "small",
    model_overrides: Mapping[str, Any] | None = None,
    compute_dtype: str = "bfloat16",
    seq_len: int = 512,
    batch_size: int = 32,
    optimizer: OptimizerConfig = OptimizerConfig(),
    steps: int = 10_000,
    seed: int = 0,
    log_every: int = 50,
    eval_every: int = 1000,
    eval_batches: int = 8,
    ckpt_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: bool = True,
    export_dtype: str = "bfloat16",
) -> TrainState:
  """Trains a target LM on a corpus directory; writes `<workdir>/target` (a `save_params` dir).

  Layout of `workdir`: checkpoints/ (resumable train states), metrics.jsonl, run.json, target/
  (the final params in `export_dtype`, loadable with `checkpoint.load_params` / `load_target`).
  """
  workdir = pathlib.Path(workdir)
  tok = Tokenizer.load(tokenizer_path)
  cfg = target_config(model, vocab_size=tok.vocab_size, compute_dtype=compute_dtype,
                      overrides=model_overrides)
  if seq_len > cfg.max_seq_len:
    raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  n_params = params_lib.count_params(params_lib.param_specs(cfg))
  log.info("target: %.2fM params, %d layers, D=%d, V=%d, compute %s", n_params / 1e6,
           cfg.num_layers, cfg.embed_dim, cfg.vocab_size, cfg.dtype)
  _write_run_json(workdir, {"kind": "target", "model_config": dataclasses.asdict(cfg),
                            "optimizer": dataclasses.asdict(optimizer), "seq_len": seq_len,
                            "batch_size": batch_size, "steps": steps, "seed": seed,
                            "corpus_dir": str(corpus_dir), "tokenizer": str(tokenizer_path)})
  loss_fn = jax.tree_util.Partial(lm_loss, config=cfg)
  return _fit_and_export(
      loss_fn, functools.partial(params_lib.init_params, cfg), kind="target",
      save=checkpoint.save_params, cfg=cfg,
      corpus_dir=corpus_dir, tok=tok, workdir=workdir, optimizer=optimizer, seq_len=seq_len,
      batch_size=batch_size, steps=steps, seed=seed, log_every=log_every, eval_every=eval_every,
      eval_batches=eval_batches, ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints,
      resume=resume, export_dtype=export_dtype,
      ckpt_metadata={"kind": "target", "tokenizer": tok.fingerprint})


def _drafter_loss(params, batch, rng, *, tparams, dcfg, tcfg, steps, step_weights, loss_type):
  from gemma_mtp import distill  # pylint: disable=g-import-not-at-top
  del rng
  return distill.drafter_loss(params, dcfg=dcfg, tparams=tparams, tcfg=tcfg,
                              tokens=batch["tokens"], mask=batch.get("mask"), steps=steps,
                              step_weights=step_weights, loss_type=loss_type)


def train_drafter(
    *,
    target_path: PathLike,
    corpus_dir: PathLike,
    tokenizer_path: PathLike,
    workdir: PathLike,
    drafter: Mapping[str, Any],
    draft_steps: int = 4,
    step_weights: Sequence[float] | None = None,
    loss_type: str = "kl",
    compute_dtype: str = "bfloat16",
    seq_len: int = 512,
    batch_size: int = 32,
    optimizer: OptimizerConfig = OptimizerConfig(),
    steps: int = 10_000,
    seconds: float = 0.0,
    seed: int = 0,
    log_every: int = 50,
    eval_every: int = 1000,
    eval_batches: int = 8,
    ckpt_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: bool = True,
    export_dtype: str = "bfloat16",
) -> TrainState:
  """Distills a drafter from a frozen target; writes `<workdir>/drafter` (`save_drafter`).

  Args:
    target_path: a target checkpoint written by `checkpoint.save_params` (e.g. by train_target).
    drafter: optional `kind` ('assistant' (default), 'parallel_heads' or 'self'; see
      `drafter_kinds`) and the keyword arguments of that kind's `for_target`. assistant
      (`drafter.for_target`): embed_dim, num_heads, mlp_dim, num_layers and optionally
      num_centroids, centroid_top_k, convention; parallel_heads: num_heads (>= draft_steps),
      mlp_dim; self: num_layers, adapter_rank (>= 1: only the adapter is trained).
    draft_steps: drafter steps unrolled per position in the loss.
    step_weights: loss weight of each draft step (default all 1).
    loss_type: 'kl' (to the target's distribution) or 'ce' (to the target's greedy token).
    seconds: > 0: train for as many steps as fit in this many seconds (after compilation; at
      most `steps`), with the optimizer's schedule fitted to them.
    Other arguments as in `train_target`.
  """
  from gemma_mtp import drafter_kinds  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  if loss_type not in ("kl", "ce"):
    raise ValueError(f"loss_type={loss_type!r}; expected 'kl' or 'ce'")
  step_weights = tuple(float(w) for w in (step_weights or (1.0,) * draft_steps))
  if len(step_weights) != draft_steps:
    raise ValueError(f"step_weights={step_weights} has {len(step_weights)} entries for "
                     f"draft_steps={draft_steps}")
  with quiet_orbax():
    tcfg, tparams = checkpoint.load_params(target_path)
  tok = Tokenizer.load(tokenizer_path)
  if tcfg.vocab_size < tok.vocab_size:
    raise ValueError(f"target {target_path} has vocab_size={tcfg.vocab_size} < the tokenizer's "
                     f"{tok.vocab_size}: they do not belong together")
  tcfg = tcfg.replace(dtype=compute_dtype)
  drafter = dict(drafter)
  dcfg = drafter_kinds.for_target(tcfg, kind=drafter.pop("kind", drafter_kinds.ASSISTANT),
                                  **drafter).replace(param_dtype="float32")
  checkpoint.check_drafter_matches(dcfg, tcfg)
  if not params_lib.count_params(drafter_kinds.param_specs(dcfg)):
    raise ValueError(f"the {dcfg.kind} drafter {dcfg} has no parameters to train (a self-drafter "
                     "needs adapter_rank >= 1)")
  longest = drafter_kinds.max_draft(dcfg)
  if longest is not None and draft_steps > longest:
    raise ValueError(f"draft_steps={draft_steps} exceeds the {longest} drafts the {dcfg.kind} "
                     "drafter makes")
  log.info("%s for a target with D=%d", drafter_kinds.describe(dcfg), tcfg.embed_dim)
  _write_run_json(workdir, {"kind": "drafter", "drafter_kind": dcfg.kind,
                            "drafter_config": dataclasses.asdict(dcfg),
                            "target": str(target_path), "draft_steps": draft_steps,
                            "step_weights": step_weights, "loss_type": loss_type,
                            "optimizer": dataclasses.asdict(optimizer), "seq_len": seq_len,
                            "batch_size": batch_size, "steps": steps, "seconds": seconds,
                            "seed": seed})
  loss_fn = jax.tree_util.Partial(
      functools.partial(_drafter_loss, dcfg=dcfg, tcfg=tcfg, steps=draft_steps,
                        step_weights=step_weights, loss_type=loss_type),
      tparams=tparams)
  return _fit_and_export(
      loss_fn, functools.partial(drafter_kinds.init_params, dcfg), kind="drafter",
      save=checkpoint.save_drafter, cfg=dcfg,
      corpus_dir=corpus_dir, tok=tok, workdir=workdir, optimizer=optimizer, seq_len=seq_len,
      batch_size=batch_size, steps=steps, seed=seed, log_every=log_every, eval_every=eval_every,
      eval_batches=eval_batches, ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints,
      resume=resume, export_dtype=export_dtype, seconds=seconds,
      ckpt_metadata={"kind": "drafter", "target": str(target_path)})
