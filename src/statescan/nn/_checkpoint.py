"""Hugging Face Mamba / Mamba-2 checkpoints without torch: config.json and safetensors.

A checkpoint directory holds ``config.json`` (the fields transformers' ``MambaConfig`` /
``Mamba2Config`` save) and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), read with the ``safetensors`` package's numpy API.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

MODEL_TYPES = ("mamba", "mamba2")


@dataclass(frozen=True)
class MambaConfig:
    """The architecture of a Mamba (``model_type="mamba"``) or Mamba-2 (``"mamba2"``)
    language model, with transformers' field names."""
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    state_size: int
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int = 0            # Mamba-1; 0 = ceil(hidden_size / 16)
    num_heads: int = 0                 # Mamba-2; 0 = expand * hidden_size / head_dim
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_limit: tuple = (0.0, math.inf)

    @property
    def intermediate_size(self):
        return int(self.expand * self.hidden_size)

    def to_dict(self):
        return asdict(self)


_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel",
               "head_dim", "n_groups", "chunk_size")


def parse_config(cfg):
    """A :class:`MambaConfig` from a config.json dict; errors name the field at fault."""
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dict (the contents of config.json), got "
                        f"{type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config field model_type must be 'mamba' or 'mamba2', got "
                         f"{model_type!r}")
    defaults = MambaConfig(model_type, 0, 0, 0, 0)
    if model_type == "mamba2":
        defaults = MambaConfig(model_type, 0, 0, 0, 128, tie_word_embeddings=False)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if name not in cfg:
            raise ValueError(f"config field {name} is missing")
    kw = {}
    for name in MambaConfig.__dataclass_fields__:
        if name == "model_type":
            continue
        if name not in cfg or (name in ("time_step_rank", "num_heads")
                               and cfg[name] in ("auto", None)):
            kw[name] = getattr(defaults, name)
            continue
        value = cfg[name]
        if name in _INT_FIELDS or name in ("expand", "time_step_rank", "num_heads"):
            value = _int_field(name, value, minimum=1)
        elif name == "layer_norm_epsilon":
            value = _float_field(name, value)
        elif name == "time_step_limit":
            value = _limit_field(value)
        else:
            value = _bool_field(name, value)
        kw[name] = value
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config field hidden_act must be 'silu', got {act!r}")
    config = MambaConfig(model_type, **kw)
    if model_type == "mamba" and config.time_step_rank == 0:
        config = _replace(config, time_step_rank=math.ceil(config.hidden_size / 16))
    if model_type == "mamba2":
        d_inner = config.intermediate_size
        if config.num_heads == 0:
            config = _replace(config, num_heads=d_inner // config.head_dim)
        if config.num_heads * config.head_dim != d_inner:
            raise ValueError(f"config fields num_heads * head_dim ({config.num_heads} * "
                             f"{config.head_dim}) must equal expand * hidden_size ({d_inner})")
        if config.num_heads % config.n_groups:
            raise ValueError(f"config field n_groups ({config.n_groups}) must divide "
                             f"num_heads ({config.num_heads})")
    return config


def _replace(config, **changes):
    return MambaConfig(**{**config.to_dict(), **changes})


def _int_field(name, value, minimum):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"config field {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"config field {name} must be >= {minimum}, got {value}")
    return value


def _float_field(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"config field {name} must be a positive number, got {value!r}")
    return float(value)


def _bool_field(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"config field {name} must be true or false, got {value!r}")
    return value


def _json_float(v):
    # transformers writes non-finite floats as {"__float__": "Infinity"}
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _limit_field(value):
    try:
        lo, hi = (_json_float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config field time_step_limit must be a pair [min, max], got "
                         f"{value!r}") from None
    if not lo <= hi:
        raise ValueError(f"config field time_step_limit must have min <= max, got {value!r}")
    return (lo, hi)


def read_config(path):
    """The parsed config.json of checkpoint directory `path`."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(file) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from None
    return parse_config(cfg)


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError:
        raise ImportError("reading a checkpoint needs the safetensors package: "
                          "pip install 'statescan[models]' (or pip install safetensors)") from None
    return st_numpy


def read_tensors(path):
    """{name: ndarray} of every tensor in the checkpoint directory (one file or shards)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
    else:
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in "
                                f"checkpoint directory {path!r}")
    st_numpy = _safetensors_numpy()
    tensors = {}
    for file in files:
        try:
            tensors.update(st_numpy.load_file(file))
        except TypeError as exc:
            if "bfloat16" not in str(exc):
                raise
            tensors.update(_read_bfloat16_file(file))
    return tensors


def _read_bfloat16_file(file):
    """A safetensors file with bfloat16 tensors (numpy has no bfloat16, so the safetensors
    numpy API refuses it): the format is an 8-byte header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw little-endian data.  bfloat16 is the
    top half of a float32, so it widens exactly."""
    kinds = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in kinds:
            raise TypeError(f"checkpoint tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[begin:end], kinds[info["dtype"]])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = arr.reshape(info["shape"])
    return tensors


def take(tensors, name, shape, dtype):
    """tensors[name] as a C-contiguous array of `dtype` with `shape`; errors name the tensor."""
    if name not in tensors:
        raise ValueError(f"checkpoint tensor {name!r} is missing")
    arr = np.asarray(tensors[name])
    if arr.dtype.kind != "f":
        raise TypeError(f"checkpoint tensor {name!r} must be floating point, got {arr.dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} must have shape {list(shape)}, got "
                         f"{list(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=dtype)
