"""Checkpoints: Hugging Face safetensors import/export and Orbax save/restore of the parameter tree.

Two on-disk formats:

* **Hugging Face** directories (`config.json` + `model.safetensors` or shards listed in
  `model.safetensors.index.json`), as released for `google/gemma-4-*` (multimodal, text weights
  under `model.language_model.`) or written by `Gemma4ForCausalLM.save_pretrained` (text-only,
  under `model.`). `read_hf_config` maps the config, `load_hf_params` maps every tensor through
  `params.param_specs` (the one description of each weight) one tensor at a time, `save_hf` is the
  inverse.
* **Orbax** directories written by `save_params`:

    <path>/model_config.json   {"format": "gemma_mtp.params", "version": 1, "step": ...,
                                "model_config": dataclasses.asdict(ModelConfig)}
    <path>/params/             the parameter pytree (orbax StandardCheckpointer)

  A save writes a hidden sibling directory and renames it into place, so a failed save never
  clobbers the last good checkpoint.

The safetensors format is read and written here directly (an 8-byte little-endian header length, a
JSON header, raw little-endian data), so bf16 works with plain numpy + ml_dtypes on any safetensors
version and tensors stream one at a time in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import struct
import uuid
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp.config import FULL, SLIDING, ModelConfig

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
TEXT_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."

ORBAX_CONFIG = "model_config.json"
ORBAX_PARAMS = "params"
ORBAX_FORMAT = "gemma_mtp.params"
ORBAX_VERSION = 1

# Gemma's special token ids (spec section 4), written into exported configs.
_PAD_ID, _EOS_ID, _BOS_ID = 0, 1, 2

_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}
_OUR_LAYER_TYPES = {v: k for k, v in _HF_LAYER_TYPES.items()}

# Tensors of KV-shared layers that released checkpoints carry but the model never uses (spec 1.7).
_KV_SHARED_RE = re.compile(r"^layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")

# Skip rules of `load_hf_params`, in report order.
SKIP_NON_TEXT = "non_text"          # vision/audio towers etc. outside the text prefix
SKIP_TIED_LM_HEAD = "tied_lm_head"  # lm_head.weight equal to the (tied) input embedding
SKIP_KV_SHARED = "kv_shared"        # k/v projections and norms of KV-shared layers


# ================================================================================================
# safetensors, read and written directly
# ================================================================================================

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  """Where one tensor lives in a safetensors file (offsets relative to the data section)."""
  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def _read_safetensors_header(file: pathlib.Path) -> dict[str, _TensorInfo]:
  """Parses the header of a safetensors file; ValueError naming the file if it is malformed."""
  size = file.stat().st_size
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{file} is not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{file} is not a valid safetensors file: header length {n} with file "
                       f"size {size}")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file} has a corrupt safetensors header: {e}") from None
  data_start, data_size = 8 + n, size - 8 - n
  infos = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _ST_DTYPES[entry["dtype"]]
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{file}: unreadable header entry for tensor {name!r}: {entry!r}") from None
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                       f"{entry['dtype']}")
    if end > data_size:
      raise ValueError(f"{file} is truncated: tensor {name!r} ends at byte {data_start + end} of "
                       f"{size}")
    infos[name] = _TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
  return infos


def _read_tensor(info: _TensorInfo, rows: Any = None) -> np.ndarray:
  """Reads one tensor (or `rows` of its first axis) into host memory."""
  if info.end == info.begin:  # mmap cannot map 0 bytes
    return np.zeros(info.shape, info.dtype)[rows if rows is not None else ...]
  mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.begin,
                 shape=(info.end - info.begin,))
  arr = mm.view(info.dtype).reshape(info.shape)
  out = np.array(arr if rows is None else arr[rows])  # a copy; the mapping is released with `mm`
  del arr, mm
  return out


_Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def _write_safetensors(file: pathlib.Path, entries: list[_Entry]):
  """Writes a safetensors file, producing (and dropping) one tensor at a time.

  Args:
    file: destination.
    entries: (name, shape, dtype, produce) in file order; `produce()` returns the array.
  """
  header, offset = {}, 0
  for name, shape, dtype, _ in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, produce in entries:
      arr = np.ascontiguousarray(produce())
      if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise ValueError(f"tensor {name!r}: produced {arr.shape} {arr.dtype}, header says "
                         f"{tuple(shape)} {dtype}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    f.flush()
    os.fsync(f.fileno())


def _hf_tensor_index(path: pathlib.Path) -> tuple[dict[str, _TensorInfo], list[str]]:
  """All tensors of a HF directory (single file or index + shards) -> (name -> info, files)."""
  single, index = path / HF_SINGLE, path / HF_INDEX
  if single.is_file():
    return _read_safetensors_header(single), [single.name]
  if not index.is_file():
    raise FileNotFoundError(f"{path} has neither {HF_SINGLE} nor {HF_INDEX}")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index} is not a valid safetensors index ({e!r})") from None
  files = sorted(set(weight_map.values()))
  infos: dict[str, _TensorInfo] = {}
  for name in files:
    shard = path / name
    if not shard.is_file():
      raise FileNotFoundError(f"shard {shard} listed in {index} does not exist")
    for key, info in _read_safetensors_header(shard).items():
      if key in infos:
        raise ValueError(f"tensor {key!r} is stored twice ({infos[key].file.name}, {name})")
      infos[key] = info
  for key, name in weight_map.items():
    if key not in infos or infos[key].file.name != name:
      raise ValueError(f"tensor {key!r} is listed in {index} under {name} but is not in that file")
  return infos, files


# ================================================================================================
# Hugging Face config
# ================================================================================================

def _load_json(file: pathlib.Path) -> dict:
  try:
    out = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(out, dict):
    raise ValueError(f"{file} does not hold a JSON object")
  return out


def _check_dir(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
  if not path.is_dir():
    raise NotADirectoryError(f"checkpoint path {str(path)!r} is not a directory")
  return path


def _hf_text_config(path: pathlib.Path) -> tuple[dict, dict]:
  """(text config dict, top-level config dict) of a HF Gemma 4 directory."""
  file = path / HF_CONFIG
  if not file.is_file():
    raise FileNotFoundError(f"{path} has no {HF_CONFIG}; expected a Hugging Face Gemma 4 "
                            "checkpoint directory")
  top = _load_json(file)
  model_type = top.get("model_type")
  if model_type == "gemma4_text":
    return top, top
  if model_type == "gemma4":
    text = top.get("text_config")
    if not isinstance(text, dict):
      raise ValueError(f"{file}: model_type 'gemma4' without a text_config")
    if text.get("model_type", "gemma4_text") != "gemma4_text":
      raise ValueError(f"{file}: text_config.model_type is {text['model_type']!r}, expected "
                       "'gemma4_text'")
    return text, top
  raise ValueError(f"{file}: model_type {model_type!r} is not a Gemma 4 text model (expected "
                   "'gemma4_text' or 'gemma4')")


def _dtype_name(value: Any, where: str) -> str:
  if value in ("bfloat16", "float32"):
    return value
  raise ValueError(f"{where}: dtype {value!r} is not supported (use 'bfloat16' or 'float32'; pass "
                   "param_dtype= to choose)")


def _check_hf_activation(act: Any, where: str):
  if act != "gelu_pytorch_tanh":
    raise ValueError(f"{where}: hidden_activation {act!r} is not supported (expected "
                     "'gelu_pytorch_tanh')")


def _hf_layer_types(c: dict, num_layers: int, where: str) -> list[str]:
  """Our layer types from a HF config's `layer_types` (transformers' default if absent)."""
  hf_types = c.get("layer_types")
  if hf_types is None:  # transformers' default: 5 sliding, 1 full
    hf_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
  if len(hf_types) != num_layers:
    raise ValueError(f"{where}: {len(hf_types)} layer_types for num_hidden_layers={num_layers}")
  bad = [t for t in hf_types if t not in _HF_LAYER_TYPES]
  if bad:
    raise ValueError(f"{where}: unknown layer type {bad[0]!r} (expected one of "
                     f"{sorted(_HF_LAYER_TYPES)})")
  layer_types = [_HF_LAYER_TYPES[t] for t in hf_types]
  if layer_types[-1] != FULL:
    log.warning("%s: last layer is %r; transformers forces it to full attention, so do we", where,
                hf_types[-1])
    layer_types[-1] = FULL
  return layer_types


def _hf_attention_dims(c: dict, get: Callable[..., Any], layer_types: list[str], num_heads: int,
                       hidden: int, where: str) -> tuple[int, int, int, int]:
  """(num_kv_heads, head_dim, global_head_dim, num_global_kv_heads) of a HF config.

  The full-layer values come from the top level (`global_head_dim`, and
  `num_global_key_value_heads` with `attention_k_eq_v`) or from the `per_layer_config` that
  `save_pretrained` writes.
  """
  num_layers = len(layer_types)
  k_eq_v = bool(c.get("attention_k_eq_v", False))
  num_kv_heads = int(get("num_key_value_heads", num_heads))
  head_dim = int(get("head_dim", hidden // num_heads))
  per_layer = c.get("per_layer_config")
  if per_layer:
    overrides = {}
    for idx, override in per_layer.items():
      i = int(idx)
      if not 0 <= i < num_layers:
        raise ValueError(f"{where}: per_layer_config names layer {idx!r} of {num_layers}")
      if layer_types[i] != FULL:
        raise ValueError(f"{where}: per_layer_config overrides sliding layer {i} ({override!r}); "
                         "only full layers may differ")
      unknown = set(override) - {"head_dim", "num_key_value_heads"}
      if unknown:
        raise ValueError(f"{where}: per_layer_config of layer {i} sets unsupported "
                         f"{sorted(unknown)}")
      overrides[i] = (int(override.get("head_dim", head_dim)),
                      int(override.get("num_key_value_heads", num_kv_heads)))
    values = {overrides.get(i, (head_dim, num_kv_heads))
              for i, t in enumerate(layer_types) if t == FULL}
    if len(values) != 1:
      raise ValueError(f"{where}: full layers have different (head_dim, kv heads) {sorted(values)}")
    global_head_dim, num_global_kv_heads = values.pop()
  else:
    global_head_dim = int(get("global_head_dim", 512))
    num_global_kv_heads = num_kv_heads
    if k_eq_v and c.get("num_global_key_value_heads") is not None:
      num_global_kv_heads = int(c["num_global_key_value_heads"])
  return num_kv_heads, head_dim, global_head_dim, num_global_kv_heads


def _hf_rope(c: dict, where: str) -> dict[str, float]:
  """The RoPE fields (rope_theta, global_rope_theta, global_rotary_fraction) of a HF config."""
  rope = c.get("rope_parameters") or {}
  sliding_rope = rope.get("sliding_attention", {"rope_type": "default", "rope_theta": 10_000.0})
  full_rope = rope.get("full_attention", {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                                          "partial_rotary_factor": 0.25})
  for kind, r in (("sliding_attention", sliding_rope), ("full_attention", full_rope)):
    if r.get("rope_type", "default") not in ("default", "proportional"):
      raise ValueError(f"{where}: rope_type {r['rope_type']!r} of {kind} layers is not supported")
    if r.get("factor", 1.0) != 1.0:
      raise ValueError(f"{where}: RoPE scaling factor {r['factor']!r} of {kind} layers is not "
                       "supported")
  if sliding_rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: partial rotation on sliding layers "
                     f"({sliding_rope['partial_rotary_factor']!r}) is not supported")
  return dict(rope_theta=float(sliding_rope.get("rope_theta", 10_000.0)),
              global_rope_theta=float(full_rope.get("rope_theta", 1_000_000.0)),
              global_rotary_fraction=float(full_rope.get("partial_rotary_factor", 1.0)))


def read_hf_config(path: PathLike, *, dtype: str | None = None,
                   param_dtype: str | None = None) -> ModelConfig:
  """Reads the `ModelConfig` of a Hugging Face Gemma 4 checkpoint directory.

  Accepts text-only (`model_type: gemma4_text`) and multimodal (`model_type: gemma4` with a
  `text_config`) configs, with the full-layer head size and KV heads either at the top level (the
  published files: `global_head_dim`, `num_global_key_value_heads`) or in the `per_layer_config`
  that `transformers`' `save_pretrained` writes.

  Args:
    path: the checkpoint directory.
    dtype: compute dtype; defaults to the parameter dtype.
    param_dtype: parameter dtype; defaults to the config's `dtype` / `torch_dtype` (bfloat16 if
      absent).

  Returns:
    The model configuration.

  Raises:
    FileNotFoundError: the directory or its config.json is missing.
    ValueError: not a Gemma 4 text model, or a feature this implementation does not support.
  """
  path = _check_dir(path)
  c, top = _hf_text_config(path)
  where = str(path / HF_CONFIG)

  def get(key, default=None):  # null in the file means "default"
    return default if c.get(key) is None else c[key]

  # ---- features we do not implement -------------------------------------------------------------
  if c.get("use_bidirectional_attention") == "all":
    raise ValueError(f"{where}: use_bidirectional_attention='all' is not supported (causal "
                     "decoder only)")
  if c.get("attention_bias"):
    raise ValueError(f"{where}: attention_bias=true is not supported (Gemma 4 has no biases)")
  _check_hf_activation(get("hidden_activation", "gelu_pytorch_tanh"), where)
  if not c.get("tie_word_embeddings", top.get("tie_word_embeddings", True)):
    raise ValueError(f"{where}: tie_word_embeddings=false is not supported (the LM head is the "
                     "input embedding)")

  # ---- layers -----------------------------------------------------------------------------------
  try:
    num_layers = int(c["num_hidden_layers"])
    hidden = int(c["hidden_size"])
    num_heads = int(c["num_attention_heads"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: missing or invalid {e}") from None
  layer_types = _hf_layer_types(c, num_layers, where)
  k_eq_v = bool(c.get("attention_k_eq_v", False))
  num_kv_heads, head_dim, global_head_dim, num_global_kv_heads = _hf_attention_dims(
      c, get, layer_types, num_heads, hidden, where)

  # ---- MoE, PLE ---------------------------------------------------------------------------------
  num_experts = top_k = expert_dim = 0
  if c.get("enable_moe_block"):
    expert = get("moe_intermediate_size", get("expert_intermediate_size"))
    if not (c.get("num_experts") and c.get("top_k_experts") and expert):
      raise ValueError(f"{where}: enable_moe_block needs num_experts, top_k_experts and "
                       "moe_intermediate_size (or expert_intermediate_size)")
    num_experts, top_k, expert_dim = int(c["num_experts"]), int(c["top_k_experts"]), int(expert)
  per_layer_dim = int(get("hidden_size_per_layer_input", 0))
  per_layer_vocab = int(get("vocab_size_per_layer_input", c.get("vocab_size"))) if per_layer_dim \
      else 0

  # ---- RoPE -------------------------------------------------------------------------------------
  rope = _hf_rope(c, where)

  # ---- dtypes -----------------------------------------------------------------------------------
  if param_dtype is None:
    file_dtype = (c.get("dtype") or c.get("torch_dtype") or top.get("dtype")
                  or top.get("torch_dtype"))
    param_dtype = _dtype_name(file_dtype or "bfloat16", where)
  dtype = dtype or param_dtype

  return ModelConfig(
      vocab_size=int(c["vocab_size"]),
      embed_dim=hidden,
      layer_types=tuple(layer_types),
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      num_global_kv_heads=num_global_kv_heads,
      mlp_dim=int(c["intermediate_size"]),
      sliding_window=int(c["sliding_window"]),
      head_dim=head_dim,
      global_head_dim=global_head_dim,
      k_eq_v=k_eq_v,
      double_wide_mlp=bool(c.get("use_double_wide_mlp", False)),
      num_kv_shared_layers=int(get("num_kv_shared_layers", 0)),
      per_layer_dim=per_layer_dim,
      per_layer_vocab_size=per_layer_vocab,
      num_experts=num_experts,
      num_experts_per_token=top_k,
      expert_dim=expert_dim,
      **rope,
      final_logit_softcap=(None if c.get("final_logit_softcapping") is None
                           else float(c["final_logit_softcapping"])),
      rms_eps=float(get("rms_norm_eps", 1e-6)),
      max_seq_len=int(get("max_position_embeddings", 131_072)),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def hf_text_config(cfg: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """`cfg` as a `transformers` `Gemma4TextConfig` dict (what `save_pretrained` writes).

  `Gemma4TextConfig.from_dict(hf_text_config(cfg))` builds the equivalent `transformers` config.
  """
  full = {str(i): {"head_dim": cfg.global_head_dim, "num_key_value_heads": cfg.num_global_kv_heads}
          for i in range(cfg.num_layers) if cfg.is_full(i)}
  return {
      "architectures": ["Gemma4ForCausalLM"],
      "model_type": "gemma4_text",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "per_layer_config": full,
      "layer_types": [_OUR_LAYER_TYPES[t] for t in cfg.layer_types],
      "sliding_window": cfg.sliding_window,
      "attention_k_eq_v": cfg.k_eq_v,
      "num_kv_shared_layers": cfg.num_kv_shared_layers,
      "use_double_wide_mlp": cfg.double_wide_mlp,
      "hidden_size_per_layer_input": cfg.per_layer_dim,
      "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
      "enable_moe_block": bool(cfg.num_experts),
      "num_experts": cfg.num_experts or None,
      "top_k_experts": cfg.num_experts_per_token or None,
      "moe_intermediate_size": cfg.expert_dim or None,
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "full_attention": {"rope_type": "proportional", "rope_theta": cfg.global_rope_theta,
                             "partial_rotary_factor": cfg.global_rotary_fraction},
      },
      "final_logit_softcapping": cfg.final_logit_softcap,
      "rms_norm_eps": cfg.rms_eps,
      "max_position_embeddings": cfg.max_seq_len,
      "hidden_activation": "gelu_pytorch_tanh",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_bidirectional_attention": None,
      "tie_word_embeddings": True,
      "pad_token_id": _PAD_ID,
      "eos_token_id": _EOS_ID,
      "bos_token_id": _BOS_ID,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": dtype or cfg.param_dtype,
  }


def _hf_multimodal_config(text: dict[str, Any]) -> dict[str, Any]:
  text = {k: v for k, v in text.items() if k != "architectures"}
  return {
      "architectures": ["Gemma4ForConditionalGeneration"],
      "model_type": "gemma4",
      "text_config": text,
      "vision_config": None,
      "audio_config": None,
      "tie_word_embeddings": True,
      "dtype": text["dtype"],
  }


# ================================================================================================
# Hugging Face tensors
# ================================================================================================

def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree, is_leaf=None) -> dict[str, Any]:
  """{'layers.3.attn.q': leaf, ...} of a params / spec tree."""
  pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in pairs}


def _spec_tree(cfg: ModelConfig, quantization: dict | None = None):
  """param_specs(cfg), or its int8 form (`quant.quantized_specs`) for a quantization record."""
  if quantization is None:
    return params_lib.param_specs(cfg)
  return quant.quantized_specs(cfg, embeddings=bool(quantization["embeddings"]))


def _flat_specs(cfg: ModelConfig, quantization: dict | None = None
                ) -> dict[str, params_lib.ParamSpec]:
  return _flat(_spec_tree(cfg, quantization), is_leaf=params_lib.is_spec)


def _names(names: Iterable[str], limit: int = 8) -> str:
  names = sorted(names)
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _detect_prefix(names: Iterable[str], path: pathlib.Path) -> str:
  names = list(names)
  if any(n.startswith(MULTIMODAL_PREFIX) for n in names):
    return MULTIMODAL_PREFIX
  if any(n.startswith(TEXT_PREFIX) for n in names):
    return TEXT_PREFIX
  raise ValueError(f"{path}: no tensor under {MULTIMODAL_PREFIX!r} or {TEXT_PREFIX!r}; is this a "
                   f"Gemma 4 checkpoint? (first tensors: {_names(names, 4)})")


def _is_kv_shared_tensor(name: str, cfg: ModelConfig) -> bool:
  """k/v projection or norm (name below the prefix) of a KV-shared layer of `cfg`."""
  m = _KV_SHARED_RE.match(name)
  return bool(m) and int(m.group(1)) < cfg.num_layers and cfg.is_kv_shared(int(m.group(1)))


def _default_place(array: np.ndarray, spec: params_lib.ParamSpec) -> jax.Array:
  del spec
  return jnp.asarray(array)


def load_hf_params(
    path: PathLike,
    cfg: ModelConfig,
    *,
    dtype: str | None = None,
    place: Callable[[np.ndarray, params_lib.ParamSpec], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
  """Loads the text-decoder weights of a Hugging Face Gemma 4 checkpoint into our parameter tree.

  Every tensor name, shape and dtype is checked from the file headers before any data is read; then
  tensors are read, converted and placed one at a time. Tensors skipped by rule (reported and
  logged):

  * `non_text`: everything outside the text prefix of a multimodal checkpoint (vision/audio towers
    and their embedders);
  * `tied_lm_head`: `lm_head.weight`, which must equal the (tied) input embedding;
  * `kv_shared`: `self_attn.{k_proj,v_proj,k_norm,v_norm}` of KV-shared layers
    (>= first_shared_layer), which released checkpoints carry but the model never uses.

  Args:
    path: HF directory with `model.safetensors` or `model.safetensors.index.json` + shards.
    cfg: the architecture (e.g. from `read_hf_config(path)`).
    dtype: parameter dtype; defaults to `cfg.param_dtype`.
    place: `place(array, spec)` turns each host array (our layout, final dtype) into the stored
      leaf, e.g. a `jax.device_put` with the sharding of `spec.axes`; default `jnp.asarray`.

  Returns:
    (params, report): params has the structure of `params.param_specs(cfg)`; report is
    `{"summary": str, "path", "prefix", "files", "loaded": [names], "skipped": {rule: [names]},
    "counts": {"loaded": n, rule: n, ...}}`.

  Raises:
    FileNotFoundError: missing directory or weight files.
    ValueError: missing, unexpected or wrongly-shaped tensors (named), or corrupt files.
  """
  path = _check_dir(path)
  out_dtype = np.dtype(dtype or cfg.param_dtype)
  place = place or _default_place
  infos, files = _hf_tensor_index(path)
  prefix = _detect_prefix(infos, path)
  multimodal = prefix == MULTIMODAL_PREFIX

  specs = _flat_specs(cfg)
  wanted = {prefix + s.hf_key: (name, s) for name, s in specs.items()}
  skipped: dict[str, list[str]] = {SKIP_NON_TEXT: [], SKIP_TIED_LM_HEAD: [], SKIP_KV_SHARED: []}
  unexpected = []
  for key in infos:
    if key in wanted:
      continue
    if key == "lm_head.weight":
      skipped[SKIP_TIED_LM_HEAD].append(key)
    elif not key.startswith(prefix):
      (skipped[SKIP_NON_TEXT] if multimodal else unexpected).append(key)
    elif _is_kv_shared_tensor(key[len(prefix):], cfg):
      skipped[SKIP_KV_SHARED].append(key)
    else:
      unexpected.append(key)
  if unexpected:
    raise ValueError(f"{path}: unexpected tensors {_names(unexpected)} (not part of a Gemma 4 text "
                     f"model with {cfg.num_layers} layers as configured)")
  missing = [k for k in wanted if k not in infos]
  if missing:
    raise ValueError(f"{path}: missing tensors {_names(missing)}")
  for key, (_, spec) in wanted.items():
    info = infos[key]
    expected = params_lib.to_hf_shape(spec)
    if info.shape != expected:
      raise ValueError(f"{path}: tensor {key!r} has shape {info.shape}, expected {expected}")
    if not np.issubdtype(info.dtype, np.floating) and info.dtype != np.dtype(ml_dtypes.bfloat16):
      raise ValueError(f"{path}: tensor {key!r} has dtype {info.dtype}, expected a float type")
  if skipped[SKIP_TIED_LM_HEAD]:
    _check_tied_head(path, infos["lm_head.weight"], infos[prefix + "embed_tokens.weight"])

  flat_params = {}
  for key, (name, spec) in wanted.items():
    host = params_lib.from_hf(spec, _read_tensor(infos[key]))
    flat_params[name] = place(host.astype(out_dtype, copy=False), spec)
    del host
  treedef = jax.tree_util.tree_structure(params_lib.param_specs(cfg), is_leaf=params_lib.is_spec)
  tree = jax.tree_util.tree_unflatten(treedef, [flat_params[n] for n in specs])

  for rule, names in skipped.items():
    if names:
      log.info("%s: skipped %d %s tensors, e.g. %s", path, len(names), rule, _names(names, 3))
  summary = f"loaded {len(wanted)} tensors from {len(files)} file(s) under {prefix!r}" + "".join(
      f"; skipped {len(n)} {rule}" for rule, n in skipped.items() if n)
  log.info("%s: %s", path, summary)
  report = {
      "summary": summary,
      "path": str(path),
      "prefix": prefix,
      "files": files,
      "loaded": sorted(wanted),
      "skipped": {rule: sorted(names) for rule, names in skipped.items()},
      "counts": {"loaded": len(wanted), **{rule: len(n) for rule, n in skipped.items()}},
  }
  return tree, report


def _check_tied_head(path: pathlib.Path, head: _TensorInfo, embed: _TensorInfo):
  """An lm_head.weight may only be skipped if it is the tied embedding (checked on sampled rows)."""
  if head.shape != embed.shape:
    raise ValueError(f"{path}: lm_head.weight has shape {head.shape}, embed_tokens.weight "
                     f"{embed.shape}; untied LM heads are not supported")
  rows = np.unique(np.linspace(0, head.shape[0] - 1, num=min(64, head.shape[0])).astype(int))
  a = _read_tensor(head, rows).astype(np.float32)
  b = _read_tensor(embed, rows).astype(np.float32)
  if not np.array_equal(a, b):
    raise ValueError(f"{path}: lm_head.weight differs from embed_tokens.weight; untied LM heads "
                     "are not supported")


def save_hf(
    path: PathLike,
    params: Any,
    cfg: ModelConfig,
    *,
    prefix: str = TEXT_PREFIX,
    max_shard_bytes: int | None = None,
    dtype: str | None = None,
    extra_tensors: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `params` as a Hugging Face checkpoint that `Gemma4ForCausalLM.from_pretrained` loads.

  Args:
    path: destination directory (written beside, then renamed into place).
    params: our parameter tree for `cfg`.
    cfg: the architecture.
    prefix: `"model."` (text-only `Gemma4ForCausalLM` layout, config model_type `gemma4_text`) or
      `"model.language_model."` (multimodal layout, config model_type `gemma4` with a
      `text_config`).
    max_shard_bytes: if set, split into `model-0000i-of-0000n.safetensors` files of at most this
      many bytes each (a larger single tensor gets its own shard) plus
      `model.safetensors.index.json`.
    dtype: tensor dtype in the files ('bfloat16' / 'float32'); defaults to `cfg.param_dtype`.
    extra_tensors: full name -> array, written as is (tests use it for vision/audio/shared-KV
      tensors).
    overwrite: replace an existing non-empty directory.

  Returns:
    The directory.
  """
  if prefix not in (TEXT_PREFIX, MULTIMODAL_PREFIX):
    raise ValueError(f"prefix must be {TEXT_PREFIX!r} or {MULTIMODAL_PREFIX!r}, got {prefix!r}")
  out_dtype = np.dtype(_dtype_name(dtype or cfg.param_dtype, "save_hf"))
  if quant.describe(params) is not None:
    raise ValueError("save_hf: params are int8-quantized (quant.py) and Hugging Face Gemma 4 has "
                     "no such format; save the float params, or use save_params (Orbax)")
  specs = _flat_specs(cfg)
  flat = _check_tree(params, specs, what="params")

  entries = []
  for name, spec in specs.items():
    def produce(spec=spec, leaf=flat[name]):
      return params_lib.to_hf(spec, np.asarray(leaf)).astype(out_dtype)
    entries.append((prefix + spec.hf_key, params_lib.to_hf_shape(spec), out_dtype, produce))
  for name, value in (extra_tensors or {}).items():
    if any(name == e[0] for e in entries):
      raise ValueError(f"extra tensor {name!r} collides with a model tensor")
    arr = np.asarray(value)
    entries.append((name, arr.shape, arr.dtype, lambda arr=arr: arr))

  shards: list[list] = [[]]
  size = 0
  for entry in entries:
    nbytes = math.prod(entry[1]) * entry[2].itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes

  text_config = hf_text_config(cfg, dtype=out_dtype.name)
  config = text_config if prefix == TEXT_PREFIX else _hf_multimodal_config(text_config)

  def write(tmp: pathlib.Path):
    (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if max_shard_bytes is None:
      _write_safetensors(tmp / HF_SINGLE, shards[0])
      return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(tmp / fname, shard)
      for name, shape, dt, _ in shard:
        weight_map[name] = fname
        total += math.prod(shape) * dt.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")

  path = pathlib.Path(path)
  if not overwrite and path.exists() and any(path.iterdir()):
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
  _atomic_write_dir(path, write)
  return path


# ================================================================================================
# Orbax
# ================================================================================================

def _check_tree(tree: Any, specs: dict[str, params_lib.ParamSpec], *, what: str) -> dict[str, Any]:
  """Flattens `tree` and checks names and shapes against `specs`; ValueError naming the tensor."""
  if params_lib.is_fused(tree):
    raise ValueError(f"{what}: the tree is in the fused inference layout "
                     "(model.fuse_projections); pass model.unfuse_projections(params, config)")
  flat = _flat(tree)
  missing = [n for n in specs if n not in flat]
  unexpected = [n for n in flat if n not in specs]
  if missing:
    raise ValueError(f"{what}: missing tensors {_names(missing)}")
  if unexpected:
    raise ValueError(f"{what}: unexpected tensors {_names(unexpected)}")
  for name, spec in specs.items():
    shape = tuple(getattr(flat[name], "shape", ()))
    if shape != spec.shape:
      raise ValueError(f"{what}: tensor {name!r} has shape {shape}, expected {spec.shape}")
  return flat


def _atomic_write_dir(path: pathlib.Path, write: Callable[[pathlib.Path], None]):
  """Runs `write(tmp)` on a fresh hidden sibling of `path`, then swaps it into place.

  On failure the sibling is removed and `path` is untouched. The swap renames the old directory
  aside, renames the new one in, then deletes the old one; should the process die between the two
  renames, the previous checkpoint survives as `.<name>.old-*` next to `path`.
  """
  path = path.absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  token = uuid.uuid4().hex[:8]
  tmp = path.parent / f".{path.name}.tmp-{token}"
  old = path.parent / f".{path.name}.old-{token}"
  tmp.mkdir()
  try:
    write(tmp)
    if path.exists():
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def _config_from_json(d: Any, where: str) -> ModelConfig:
  if not isinstance(d, dict):
    raise ValueError(f"{where}: model_config is not a JSON object")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f"{where}: unknown ModelConfig fields {sorted(unknown)}")
  d = dict(d)
  if "layer_types" in d:
    d["layer_types"] = tuple(d["layer_types"])
  try:
    return ModelConfig(**d)
  except TypeError as e:
    raise ValueError(f"{where}: invalid model_config ({e})") from None


def _short(e: BaseException, limit: int = 300) -> str:
  """`Type: message`, cut to `limit` characters (tensorstore errors embed whole specs)."""
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _orbax():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (slow import)
  return ocp


def _write_orbax(directory: pathlib.Path, params: Any):
  """Writes the parameter tree with orbax into `directory` (which must not exist)."""
  ocp = _orbax()
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(directory.absolute(), params)   # orbax misreads relative paths' metadata
    ckptr.wait_until_finished()
  finally:
    ckptr.close()


def save_params(path: PathLike, params: Any, cfg: ModelConfig, *, step: int | None = None):
  """Saves `params` and `cfg` as an Orbax checkpoint directory.

  Written to a hidden sibling directory and renamed into place: a save that fails (or is killed)
  leaves the previous checkpoint at `path` loadable and intact.

  Args:
    path: checkpoint directory (`model_config.json` + `params/`).
    params: parameter tree of `cfg` (jax or numpy arrays; any sharding), float or int8-quantized
      (`quant.quantize_params`; the quantization is recorded and `load_params` restores it).
    cfg: the architecture, stored as JSON.
    step: optional training step, stored in model_config.json (see `checkpoint_step`).

  Raises:
    ValueError: `params` does not match `cfg` (the tensor is named).
    FileExistsError: `path` is a non-empty directory that is not a gemma_mtp checkpoint.
  """
  quantization = quant.describe(params)
  _check_tree(params, _flat_specs(cfg, quantization), what="params")
  path = pathlib.Path(path)
  if path.exists() and any(path.iterdir()) and not is_orbax_dir(path):
    raise FileExistsError(f"{path} exists and is not a gemma_mtp checkpoint; refusing to replace "
                          "it")
  meta = {"format": ORBAX_FORMAT, "version": ORBAX_VERSION, "step": step,
          "model_config": _config_to_json(cfg)}
  if quantization is not None:
    meta["quantization"] = quantization

  def write(tmp: pathlib.Path):
    _write_orbax(tmp / ORBAX_PARAMS, params)
    # Written last: a directory with model_config.json is complete.
    with open(tmp / ORBAX_CONFIG, "w") as f:
      json.dump(meta, f, indent=2)
      f.flush()
      os.fsync(f.fileno())

  _atomic_write_dir(path, write)


def _read_orbax_meta(path: pathlib.Path) -> dict[str, Any]:
  file = path / ORBAX_CONFIG
  if not file.is_file():
    leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.old-*"))
    hint = f" (a previous version survives as {leftovers})" if leftovers else ""
    raise FileNotFoundError(f"{path} has no {ORBAX_CONFIG}: not a gemma_mtp checkpoint, or an "
                            f"incomplete one{hint}")
  meta = _load_json(file)
  if meta.get("format") != ORBAX_FORMAT or "model_config" not in meta:
    hint = "; it holds a drafter: use load_drafter" if meta.get("kind") == "drafter" else ""
    raise ValueError(f"{file} is not a gemma_mtp target checkpoint config (format "
                     f"{meta.get('format')!r}){hint}")
  return meta


def checkpoint_step(path: PathLike) -> int | None:
  """The `step` stored by `save_params` (None if none was given)."""
  return _read_orbax_meta(_check_dir(path))["step"]


def stored_quantization(path: PathLike) -> dict | None:
  """The quantization record of a `save_params` checkpoint ({"method", "embeddings"}) or None."""
  meta = _read_orbax_meta(_check_dir(path))
  return _quantization_of(meta, str(_check_dir(path) / ORBAX_CONFIG))


def _quantization_of(meta: dict, where: str) -> dict | None:
  q = meta.get("quantization")
  if q is None:
    return None
  if not isinstance(q, dict) or q.get("method") != quant.METHOD or "embeddings" not in q:
    raise ValueError(f"{where}: unsupported quantization record {q!r}; this version reads "
                     f"{{'method': {quant.METHOD!r}, 'embeddings': bool}}")
  return q


def _saved_arrays(params_dir: pathlib.Path) -> dict[str, Any]:
  """name -> array metadata (.shape, .dtype) of an orbax checkpoint; ValueError if unreadable."""
  ocp = _orbax()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      md = ckptr.metadata(params_dir.absolute())
  except Exception as e:  # orbax raises many types for damaged directories
    raise ValueError(f"orbax checkpoint {params_dir} is corrupt or truncated: cannot read its "
                     f"metadata ({_short(e)})") from e
  tree = getattr(md, "item_metadata", md)  # StepMetadata (0.12) or the tree itself
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, (dict, list)):
    raise ValueError(f"orbax checkpoint {params_dir} is corrupt or truncated: unreadable metadata "
                     f"({type(tree).__name__})")
  return _flat(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def load_params(path: PathLike, *, target: Any = None) -> tuple[ModelConfig, Any]:
  """Loads a checkpoint written by `save_params`.

  Args:
    path: the checkpoint directory.
    target: optional tree of `jax.ShapeDtypeStruct` (structure of `param_specs(cfg)`, or of
      `quant.quantized_specs` for a quantized checkpoint, see `stored_quantization`) to restore
      into; its dtypes and shardings are used (arrays are cast / placed accordingly), or a function
      `target(cfg)` returning such a tree from the stored config (see `sharding.load_sharded`).
      Default: the saved dtypes on the default device.

  Returns:
    (cfg, params); params are int8-quantized (`quant.QArray` leaves) if they were saved so.

  Raises:
    FileNotFoundError: missing directory, config or params.
    ValueError: corrupt config, corrupt or truncated arrays, or arrays / target not matching the
      config (the tensor is named).
  """
  path = _check_dir(path)
  meta = _read_orbax_meta(path)
  cfg = _config_from_json(meta["model_config"], str(path / ORBAX_CONFIG))
  quantization = _quantization_of(meta, str(path / ORBAX_CONFIG))
  specs = _flat_specs(cfg, quantization)
  treedef = jax.tree_util.tree_structure(_spec_tree(cfg, quantization), is_leaf=params_lib.is_spec)
  return cfg, _restore_orbax(path, specs, treedef, cfg, target)


def _restore_orbax(path: pathlib.Path, specs: dict[str, params_lib.ParamSpec], treedef: Any,
                   cfg: Any, target: Any) -> Any:
  """Restores `<path>/params` (a tree `treedef` of `specs`) into `target` (see `load_params`)."""
  params_dir = path / ORBAX_PARAMS
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{path} has no {ORBAX_PARAMS}/ directory")
  saved = _check_tree_meta(_saved_arrays(params_dir), specs, where=str(params_dir))
  if target is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(specs[n].shape, saved[n].dtype, sharding=device) for n in specs])
  else:
    target = target(cfg) if callable(target) else target
    _check_tree(target, specs, what="target")
  ocp = _orbax()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(params_dir.absolute(), target)
  except Exception as e:
    raise ValueError(f"orbax checkpoint {params_dir} is corrupt or truncated: restore failed "
                     f"({_short(e)})") from e
  flat = _check_tree(restored, specs, what=str(params_dir))
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in specs])


def _check_tree_meta(saved: dict[str, Any], specs: dict[str, params_lib.ParamSpec], *, where: str):
  missing = [n for n in specs if n not in saved]
  unexpected = [n for n in saved if n not in specs]
  if missing:
    raise ValueError(f"{where}: tensors {_names(missing)} required by the config are not in the "
                     "checkpoint")
  if unexpected:
    raise ValueError(f"{where}: checkpoint holds tensors {_names(unexpected)} the config does not "
                     "have")
  for name, spec in specs.items():
    if tuple(saved[name].shape) != spec.shape:
      raise ValueError(f"{where}: tensor {name!r} has shape {tuple(saved[name].shape)} in the "
                       f"checkpoint, the config expects {spec.shape}")
  return saved


# ================================================================================================
# Dispatch
# ================================================================================================

def is_hf_dir(path: PathLike) -> bool:
  """A directory with a config.json and safetensors weights (single file or index)."""
  path = pathlib.Path(path)
  has_weights = (path / HF_SINGLE).is_file() or (path / HF_INDEX).is_file()
  return (path / HF_CONFIG).is_file() and has_weights


def is_orbax_dir(path: PathLike) -> bool:
  """A directory written by `save_params`."""
  path = pathlib.Path(path)
  return (path / ORBAX_CONFIG).is_file() and (path / ORBAX_PARAMS).is_dir()


def load_target(path: PathLike, *, param_dtype: str | None = None, target: Any = None,
                place: Callable | None = None) -> tuple[ModelConfig, Any]:
  """Loads a decoder from either format: (cfg, params).

  Args:
    path: a gemma_mtp Orbax checkpoint or a Hugging Face Gemma 4 directory.
    param_dtype: HF only: parameter dtype (default: the checkpoint's).
    target: Orbax only: see `load_params`.
    place: HF only: see `load_hf_params`.
  """
  path = _check_dir(path)
  if is_orbax_dir(path):
    if param_dtype is not None or place is not None:
      raise ValueError("param_dtype/place apply to Hugging Face checkpoints; pass target= for "
                       f"the Orbax checkpoint {path}")
    return load_params(path, target=target)
  if is_hf_dir(path):
    if target is not None:
      raise ValueError(f"target= applies to Orbax checkpoints; {path} is a Hugging Face directory")
    cfg = read_hf_config(path, param_dtype=param_dtype)
    tree, _ = load_hf_params(path, cfg, place=place)
    return cfg, tree
  raise ValueError(f"{path} is neither a gemma_mtp Orbax checkpoint ({ORBAX_CONFIG} + "
                   f"{ORBAX_PARAMS}/) nor a Hugging Face checkpoint ({HF_CONFIG} + {HF_SINGLE} or "
                   f"{HF_INDEX})")


# ================================================================================================
# Drafter (MTP assistant) checkpoints
# ================================================================================================
#
# Hugging Face: a `Gemma4AssistantForCausalLM` directory (config.json with model_type
# "gemma4_assistant" and a gemma4_text `text_config`; tensors under their full names, see
# `drafter.param_specs`). Orbax: like `save_params`, with model_config.json holding
# {"format": "gemma_mtp.drafter", "kind": "drafter", "drafter_kind": ..., "drafter_config": {...}}
# so that a drafter and a target checkpoint can never be loaded as one another. `drafter_kind` is
# one of `drafter_kinds` ('assistant' when absent: checkpoints written before the other kinds).

DRAFTER_FORMAT = "gemma_mtp.drafter"
DRAFTER_KIND = "drafter"
_HF_ASSISTANT_TYPE = "gemma4_assistant"
_TOKEN_ORDERING_KEY = "masked_embedding.token_ordering"
_DEFAULT_NUM_CENTROIDS = 2048  # transformers' default; written for dense heads (unused there)


def _drafter_lib():
  from gemma_mtp import drafter  # pylint: disable=g-import-not-at-top  (drafter imports model)
  return drafter


def _kinds():
  from gemma_mtp import drafter_kinds  # pylint: disable=g-import-not-at-top  (imports model)
  return drafter_kinds


def _flat_drafter_specs(dcfg) -> dict[str, params_lib.ParamSpec]:
  return _flat(_kinds().param_specs(dcfg), is_leaf=params_lib.is_spec)


def _drafter_treedef(dcfg):
  return jax.tree_util.tree_structure(_kinds().param_specs(dcfg), is_leaf=params_lib.is_spec)


def _hf_assistant_config(path: pathlib.Path) -> tuple[dict, dict]:
  """(text_config dict, top-level dict) of a HF assistant directory."""
  file = path / HF_CONFIG
  if not file.is_file():
    raise FileNotFoundError(f"{path} has no {HF_CONFIG}; expected a Hugging Face Gemma 4 "
                            "assistant checkpoint directory")
  top = _load_json(file)
  model_type = top.get("model_type")
  if model_type != _HF_ASSISTANT_TYPE:
    hint = (" (that is a target model; load it with load_target)"
            if model_type in ("gemma4", "gemma4_text") else "")
    raise ValueError(f"{file}: model_type {model_type!r} is not a Gemma 4 drafter (expected "
                     f"{_HF_ASSISTANT_TYPE!r}){hint}")
  text = top.get("text_config")
  if not isinstance(text, dict):
    raise ValueError(f"{file}: model_type {_HF_ASSISTANT_TYPE!r} without a text_config")
  if text.get("model_type", "gemma4_text") != "gemma4_text":
    raise ValueError(f"{file}: text_config.model_type is {text['model_type']!r}, expected "
                     "'gemma4_text'")
  return text, top


def read_hf_drafter_config(path: PathLike, target_cfg: ModelConfig, *,
                           convention: str = "hf"):
  """Reads the `DrafterConfig` of a HF `Gemma4AssistantForCausalLM` directory.

  Head sizes and KV-head counts are read like `read_hf_config` does for targets (top-level
  `global_head_dim` / `num_global_key_value_heads` (the latter only with `attention_k_eq_v`), or the
  `per_layer_config` that `save_pretrained` writes). Compatibility with the target is checked
  separately (`check_drafter_matches`).

  Args:
    path: the assistant directory.
    target_cfg: the target's config; the drafter takes its `dtype` and `param_dtype`.
    convention: `DrafterConfig.convention` ('hf' or 'clean').

  Raises:
    FileNotFoundError: the directory or its config.json is missing.
    ValueError: not a Gemma 4 assistant, or a feature the drafter does not support.
  """
  drafter = _drafter_lib()
  path = _check_dir(path)
  c, top = _hf_assistant_config(path)
  where = str(path / HF_CONFIG)

  def get(key, default=None):  # null in the file means "default"
    return default if c.get(key) is None else c[key]

  for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
    if get(key, 0):
      raise ValueError(f"{where}: text_config.{key}={c[key]!r}; drafters have no per-layer "
                       "embeddings (must be 0)")
  for key in ("enable_moe_block", "use_double_wide_mlp", "attention_bias"):
    if c.get(key):
      raise ValueError(f"{where}: text_config.{key}={c[key]!r} is not supported in a drafter")
  _check_hf_activation(get("hidden_activation", "gelu_pytorch_tanh"), where)
  if not top.get("tie_word_embeddings", c.get("tie_word_embeddings", True)):
    raise ValueError(f"{where}: tie_word_embeddings=false is not supported (the drafter's head is "
                     "its embed_tokens)")
  try:
    num_layers = int(c["num_hidden_layers"])
    hidden = int(c["hidden_size"])
    num_heads = int(c["num_attention_heads"])
    vocab = int(c["vocab_size"])
    mlp_dim = int(c["intermediate_size"])
    backbone = int(top["backbone_hidden_size"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: missing or invalid {e}") from None
  shared = get("num_kv_shared_layers", 0)
  if shared not in (0, num_layers):  # transformers turns 0 into num_layers
    raise ValueError(f"{where}: num_kv_shared_layers={shared!r}; every drafter layer reads the "
                     f"target's K/V (expected {num_layers})")

  layer_types = _hf_layer_types(c, num_layers, where)
  num_kv_heads, head_dim, global_head_dim, num_global_kv_heads = _hf_attention_dims(
      c, get, layer_types, num_heads, hidden, where)
  rope = _hf_rope(c, where)

  # ---- head -------------------------------------------------------------------------------------
  num_centroids, top_k = 0, int(top.get("centroid_intermediate_top_k") or 32)
  if top.get("use_ordered_embeddings"):
    num_centroids = int(top.get("num_centroids") or _DEFAULT_NUM_CENTROIDS)
    if num_centroids <= 0 or vocab % num_centroids:
      raise ValueError(f"{where}: num_centroids={num_centroids} does not divide vocab_size={vocab}")
    if not 0 < top_k <= num_centroids:
      raise ValueError(f"{where}: centroid_intermediate_top_k={top_k} must be in "
                       f"[1, num_centroids={num_centroids}]")

  try:
    return drafter.DrafterConfig(
        target_embed_dim=backbone,
        embed_dim=hidden,
        vocab_size=vocab,
        layer_types=tuple(layer_types),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        num_global_kv_heads=num_global_kv_heads,
        mlp_dim=mlp_dim,
        sliding_window=int(c["sliding_window"]) if c.get("sliding_window") is not None
        else target_cfg.sliding_window,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_centroids=num_centroids,
        centroid_top_k=top_k,
        convention=convention,
        **rope,
        rms_eps=float(get("rms_norm_eps", 1e-6)),
        dtype=target_cfg.dtype,
        param_dtype=target_cfg.param_dtype,
    )
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def check_drafter_matches(dcfg, target_cfg: ModelConfig):
  """Raises ValueError if the drafter cannot run with `target_cfg`.

  Assistant drafters: backbone width (= target embed_dim), vocabulary, and per attention type the
  drafter uses: that the target has a tap layer of that type, the head dim and KV-head count of
  that tap layer, GQA divisibility, and (sliding) the window. A RoPE mismatch is only logged (the
  drafter runs, but queries and keys rotate differently). Other kinds: their module's
  `check_matches` (width, vocabulary, layer count).
  """
  if dcfg.kind != _drafter_lib().DrafterConfig.kind:
    problems = _kinds().module(dcfg.kind).check_matches(dcfg, target_cfg)
    if problems:
      raise ValueError(f"{dcfg.kind} drafter does not match the target: " + "; ".join(problems))
    return
  problems = []
  if dcfg.target_embed_dim != target_cfg.embed_dim:
    problems.append(f"drafter backbone width (backbone_hidden_size) {dcfg.target_embed_dim} != "
                    f"target embed_dim {target_cfg.embed_dim}")
  if dcfg.vocab_size != target_cfg.vocab_size:
    problems.append(f"drafter vocab_size {dcfg.vocab_size} != target vocab_size "
                    f"{target_cfg.vocab_size}")
  taps = target_cfg.tap_layers
  for kind in (SLIDING, FULL):
    if kind not in dcfg.layer_types:
      continue
    if kind not in taps:
      problems.append(f"drafter has {kind} layers but the target has no {kind} layer to tap")
      continue
    layer = taps[kind]
    d_hd, d_kv = ((dcfg.global_head_dim, dcfg.num_global_kv_heads) if kind == FULL
                  else (dcfg.head_dim, dcfg.num_kv_heads))
    t_hd, t_kv = target_cfg.layer_head_dim(layer), target_cfg.layer_kv_heads(layer)
    if d_hd != t_hd:
      problems.append(f"drafter {kind} head_dim {d_hd} != target tap layer {layer} head_dim {t_hd}")
    if d_kv != t_kv:
      problems.append(f"drafter {kind} kv heads {d_kv} != target tap layer {layer} kv heads {t_kv}")
    if dcfg.num_heads % t_kv:
      problems.append(f"drafter num_heads {dcfg.num_heads} is not a multiple of the target's "
                      f"{kind} kv heads {t_kv}")
  if SLIDING in dcfg.layer_types and dcfg.sliding_window != target_cfg.sliding_window:
    problems.append(f"drafter sliding_window {dcfg.sliding_window} != target sliding_window "
                    f"{target_cfg.sliding_window}")
  if problems:
    raise ValueError("drafter does not match the target: " + "; ".join(problems))
  rope_d = (dcfg.rope_theta, dcfg.global_rope_theta, dcfg.global_rotary_fraction)
  rope_t = (target_cfg.rope_theta, target_cfg.global_rope_theta, target_cfg.global_rotary_fraction)
  if rope_d != rope_t:
    log.warning("drafter RoPE (theta, global theta, global fraction) %s differs from the target's "
                "%s", rope_d, rope_t)


def _check_token_ordering(order: np.ndarray, vocab: int, where: str):
  """token_ordering must be a permutation of range(vocab)."""
  counts = np.bincount(np.clip(order, 0, vocab), minlength=vocab + 1)
  if order.min(initial=0) < 0 or order.max(initial=0) >= vocab or np.any(counts[:vocab] != 1):
    out_of_range = order[(order < 0) | (order >= vocab)]
    if out_of_range.size:
      detail = f"value {int(out_of_range[0])} is outside [0, {vocab})"
    else:
      dup = int(np.argmax(counts[:vocab]))
      detail = f"value {dup} appears {int(counts[dup])} times"
    hint = " (all zeros: transformers' initial value, never set)" if not np.any(order) else ""
    raise ValueError(f"{where}: {_TOKEN_ORDERING_KEY} is not a permutation of range({vocab}): "
                     f"{detail}{hint}")


def load_hf_drafter_params(
    path: PathLike,
    dcfg,
    *,
    place: Callable[[np.ndarray, params_lib.ParamSpec], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
  """Loads the tensors of a HF `Gemma4AssistantForCausalLM` directory into our drafter tree.

  Every tensor goes through `drafter.param_specs(dcfg)` (full tensor names). `lm_head.weight`, if
  present, is skipped by rule (`tied_lm_head`) after checking it equals `model.embed_tokens.weight`.
  `masked_embedding.token_ordering` (int64 in the file) becomes an int32 array and must be a
  permutation of range(V). Float tensors are cast to `dcfg.param_dtype`.

  Returns:
    (params, report) with report as in `load_hf_params` (prefix "").

  Raises:
    FileNotFoundError: missing directory or weight files.
    ValueError: missing, unexpected or wrongly-shaped tensors (named), a bad token_ordering, or
      corrupt files.
  """
  path = _check_dir(path)
  place = place or _default_place
  infos, files = _hf_tensor_index(path)
  specs = _flat_drafter_specs(dcfg)
  wanted = {s.hf_key: (name, s) for name, s in specs.items()}
  skipped: dict[str, list[str]] = {SKIP_TIED_LM_HEAD: []}
  unexpected = []
  for key in infos:
    if key in wanted:
      continue
    (skipped[SKIP_TIED_LM_HEAD] if key == "lm_head.weight" else unexpected).append(key)
  head = "centroid" if dcfg.num_centroids else "dense"
  if unexpected:
    raise ValueError(f"{path}: unexpected tensors {_names(unexpected)} (not part of a drafter with "
                     f"{dcfg.num_layers} layers and a {head} head as configured)")
  missing = [k for k in wanted if k not in infos]
  if missing:
    raise ValueError(f"{path}: missing tensors {_names(missing)} (drafter with {dcfg.num_layers} "
                     f"layers and a {head} head)")
  for key, (_, spec) in wanted.items():
    info = infos[key]
    expected = params_lib.to_hf_shape(spec)
    if info.shape != expected:
      raise ValueError(f"{path}: tensor {key!r} has shape {info.shape}, expected {expected}")
    is_float = np.issubdtype(info.dtype, np.floating) or info.dtype == np.dtype(ml_dtypes.bfloat16)
    if key == _TOKEN_ORDERING_KEY:
      if not np.issubdtype(info.dtype, np.integer):
        raise ValueError(f"{path}: tensor {key!r} has dtype {info.dtype}, expected an integer type")
    elif not is_float:
      raise ValueError(f"{path}: tensor {key!r} has dtype {info.dtype}, expected a float type")
  if skipped[SKIP_TIED_LM_HEAD]:
    _check_tied_head(path, infos["lm_head.weight"], infos["model.embed_tokens.weight"])

  flat_params = {}
  for key, (name, spec) in wanted.items():
    host = params_lib.from_hf(spec, _read_tensor(infos[key]))
    if key == _TOKEN_ORDERING_KEY:
      _check_token_ordering(host, dcfg.vocab_size, str(path))
    out_dtype = params_lib.spec_dtype(spec, dcfg)
    flat_params[name] = place(host.astype(out_dtype, copy=False), spec)
    del host
  treedef = _drafter_treedef(dcfg)
  tree = jax.tree_util.tree_unflatten(treedef, [flat_params[n] for n in specs])

  summary = f"loaded {len(wanted)} drafter tensors from {len(files)} file(s)" + "".join(
      f"; skipped {len(n)} {rule}" for rule, n in skipped.items() if n)
  log.info("%s: %s", path, summary)
  report = {
      "summary": summary,
      "path": str(path),
      "prefix": "",
      "files": files,
      "loaded": sorted(wanted),
      "skipped": {rule: sorted(names) for rule, names in skipped.items()},
      "counts": {"loaded": len(wanted), **{rule: len(n) for rule, n in skipped.items()}},
  }
  return tree, report


def hf_drafter_config(dcfg, *, dtype: str | None = None) -> dict[str, Any]:
  """`dcfg` as a `transformers` `Gemma4AssistantConfig` dict (what `save_pretrained` writes)."""
  dtype = dtype or dcfg.param_dtype
  text = hf_text_config(dcfg.as_decoder(), dtype=dtype)
  text.pop("architectures")
  text.update(
      num_kv_shared_layers=dcfg.num_layers,   # every layer reads the target's K/V
      hidden_size_per_layer_input=0,
      vocab_size_per_layer_input=0,
      attention_k_eq_v=False,                 # no K/V weights; per_layer_config sets the kv heads
      use_double_wide_mlp=False,
      enable_moe_block=False,
      final_logit_softcapping=None,
  )
  return {
      "architectures": ["Gemma4AssistantForCausalLM"],
      "model_type": _HF_ASSISTANT_TYPE,
      "backbone_hidden_size": dcfg.target_embed_dim,
      "use_ordered_embeddings": bool(dcfg.num_centroids),
      "num_centroids": dcfg.num_centroids or _DEFAULT_NUM_CENTROIDS,
      "centroid_intermediate_top_k": dcfg.centroid_top_k,
      "tie_word_embeddings": True,
      "dtype": dtype,
      "text_config": text,
  }


def save_hf_drafter(path: PathLike, params: Any, dcfg, *, dtype: str | None = None,
                    overwrite: bool = False) -> pathlib.Path:
  """Writes a drafter as a HF directory that `Gemma4AssistantForCausalLM.from_pretrained` loads.

  Inverse of `read_hf_drafter_config` + `load_hf_drafter_params`: config.json and one
  model.safetensors (no `lm_head.weight`: it is tied; `token_ordering` as int64).

  Args:
    dtype: float tensor dtype in the file ('bfloat16' / 'float32'); default `dcfg.param_dtype`.
    overwrite: replace an existing non-empty directory.
  """
  out_dtype = np.dtype(_dtype_name(dtype or dcfg.param_dtype, "save_hf_drafter"))
  specs = _flat_drafter_specs(dcfg)
  flat = _check_tree(params, specs, what="drafter params")
  if dcfg.num_centroids:
    _check_token_ordering(np.asarray(flat["token_ordering"]), dcfg.vocab_size, "drafter params")
  entries = []
  for name, spec in specs.items():
    file_dtype = np.dtype(np.int64) if spec.hf_key == _TOKEN_ORDERING_KEY else out_dtype
    def produce(spec=spec, leaf=flat[name], file_dtype=file_dtype):
      return params_lib.to_hf(spec, np.asarray(leaf)).astype(file_dtype)
    entries.append((spec.hf_key, params_lib.to_hf_shape(spec), file_dtype, produce))
  config = hf_drafter_config(dcfg, dtype=out_dtype.name)

  def write(tmp: pathlib.Path):
    (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(tmp / HF_SINGLE, entries)

  path = pathlib.Path(path)
  if not overwrite and path.exists() and any(path.iterdir()):
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
  _atomic_write_dir(path, write)
  return path


def _drafter_config_from_json(d: Any, where: str, kind: str = "assistant"):
  try:
    cls = _kinds().config_class(kind)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{where}: drafter_config is not a JSON object")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f"{where}: unknown {cls.__name__} fields {sorted(unknown)}")
  d = dict(d)
  if "layer_types" in d:
    d["layer_types"] = tuple(d["layer_types"])
  for name, value in d.items():   # a nested ModelConfig (a self-drafter's int8_layers)
    if isinstance(value, dict):
      d[name] = _config_from_json(value, f"{where} ({name})")
  try:
    return cls(**d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: invalid drafter_config ({e})") from None


def save_drafter(path: PathLike, params: Any, dcfg, *, step: int | None = None):
  """Saves a drafter as an Orbax checkpoint directory (atomic, like `save_params`).

  model_config.json holds {"format": "gemma_mtp.drafter", "kind": "drafter", "drafter_kind",
  "version", "step", "drafter_config"}; `params/` the tree (absent when the drafter has no
  parameters: a self-drafter without adapter).

  Raises:
    ValueError: `params` does not match `dcfg` (the tensor is named).
    FileExistsError: `path` is a non-empty directory that is not a gemma_mtp checkpoint.
  """
  _check_tree(params, _flat_drafter_specs(dcfg), what="drafter params")
  path = pathlib.Path(path)
  if path.exists() and any(path.iterdir()) and not is_orbax_dir(path):
    raise FileExistsError(f"{path} exists and is not a gemma_mtp checkpoint; refusing to replace "
                          "it")
  if is_orbax_dir(path):
    try:
      old_format = _load_json(path / ORBAX_CONFIG).get("format")
    except ValueError:
      old_format = None
    if old_format == ORBAX_FORMAT:
      raise FileExistsError(f"{path} holds a target model checkpoint; refusing to replace it with "
                            "a drafter")
  meta = {"format": DRAFTER_FORMAT, "kind": DRAFTER_KIND, "drafter_kind": dcfg.kind,
          "version": ORBAX_VERSION, "step": step, "drafter_config": dataclasses.asdict(dcfg)}
  has_params = bool(_flat_drafter_specs(dcfg))  # orbax cannot write an empty tree

  def write(tmp: pathlib.Path):
    if has_params:
      _write_orbax(tmp / ORBAX_PARAMS, params)
    else:
      (tmp / ORBAX_PARAMS).mkdir()
    with open(tmp / ORBAX_CONFIG, "w") as f:  # written last: the directory is complete
      json.dump(meta, f, indent=2)
      f.flush()
      os.fsync(f.fileno())

  _atomic_write_dir(path, write)


def load_drafter_params(path: PathLike, *, target: Any = None) -> tuple[Any, Any]:
  """Loads a drafter written by `save_drafter`: (DrafterConfig, params) in the saved dtypes.

  Args:
    target: as in `load_params` (a ShapeDtypeStruct tree, or a function of the stored
      DrafterConfig returning one); default: the saved dtypes on the default device.

  Raises:
    FileNotFoundError: missing directory, config or params.
    ValueError: a target (not drafter) checkpoint, a corrupt config, or corrupt / mismatching
      arrays (the tensor is named).
  """
  path = _check_dir(path)
  file = path / ORBAX_CONFIG
  if not file.is_file():
    if is_hf_dir(path):
      raise ValueError(f"{path} is a Hugging Face directory, not an Orbax drafter checkpoint; use "
                       "load_drafter / load_hf_drafter_params")
    leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.old-*"))
    hint = f" (a previous version survives as {leftovers})" if leftovers else ""
    raise FileNotFoundError(f"{path} has no {ORBAX_CONFIG}: not a gemma_mtp checkpoint, or an "
                            f"incomplete one{hint}")
  meta = _load_json(file)
  if meta.get("format") == ORBAX_FORMAT:
    raise ValueError(f"{path} holds a target model (format {ORBAX_FORMAT!r}), not a drafter; load "
                     "it with load_params / load_target")
  if meta.get("format") != DRAFTER_FORMAT or meta.get("kind") != DRAFTER_KIND \
      or "drafter_config" not in meta:
    raise ValueError(f"{file} is not a gemma_mtp drafter checkpoint config (format "
                     f"{meta.get('format')!r}, kind {meta.get('kind')!r})")
  dcfg = _drafter_config_from_json(meta["drafter_config"], str(file),
                                   meta.get("drafter_kind", "assistant"))
  if not _flat_drafter_specs(dcfg):
    return dcfg, jax.tree_util.tree_unflatten(_drafter_treedef(dcfg), [])
  return dcfg, _restore_orbax(path, _flat_drafter_specs(dcfg), _drafter_treedef(dcfg), dcfg,
                              target)


def is_hf_drafter_dir(path: PathLike) -> bool:
  """A HF directory whose config.json has model_type 'gemma4_assistant'."""
  path = pathlib.Path(path)
  if not is_hf_dir(path):
    return False
  try:
    return _load_json(path / HF_CONFIG).get("model_type") == _HF_ASSISTANT_TYPE
  except ValueError:
    return False


def with_convention(dcfg, convention: str, *, where: str):
  """`dcfg` with another tap convention; ValueError for drafters that have none (not assistants)."""
  if dcfg.kind != _drafter_lib().DrafterConfig.kind:
    raise ValueError(f"{where} holds a {dcfg.kind} drafter; convention={convention!r} applies to "
                     "assistant drafters only")
  return dcfg.replace(convention=convention)


def load_drafter(path: PathLike, target_cfg: ModelConfig, *,
                 convention: str | None = None) -> tuple[Any, Any]:
  """Loads a drafter for `target_cfg` from either format: (DrafterConfig, params).

  The drafter is checked against the target (`check_drafter_matches`, before any tensor is read
  for HF directories) and gets the target's dtype and param_dtype (float params are cast).

  Args:
    path: a HF `Gemma4AssistantForCausalLM` directory or a `save_drafter` directory.
    target_cfg: the target the drafter will run with.
    convention: 'hf' / 'clean' (assistant drafters only); default: 'hf' for HF directories, the
      stored one for Orbax.
  """
  path = _check_dir(path)
  if is_orbax_dir(path):
    dcfg, tree = load_drafter_params(path)
    if convention is not None:
      dcfg = with_convention(dcfg, convention, where=str(path))
    check_drafter_matches(dcfg, target_cfg)
    dcfg = dcfg.replace(dtype=target_cfg.dtype, param_dtype=target_cfg.param_dtype)
    return dcfg, quant.cast(tree, dcfg.param_dtype)   # int8 weights (and their scales) stay
  if is_hf_dir(path):
    dcfg = read_hf_drafter_config(path, target_cfg, convention=convention or "hf")
    check_drafter_matches(dcfg, target_cfg)
    tree, _ = load_hf_drafter_params(path, dcfg)
    return dcfg, tree
  raise ValueError(f"{path} is neither a gemma_mtp Orbax drafter checkpoint ({ORBAX_CONFIG} + "
                   f"{ORBAX_PARAMS}/) nor a Hugging Face assistant checkpoint ({HF_CONFIG} + "
                   f"{HF_SINGLE} or {HF_INDEX})")
