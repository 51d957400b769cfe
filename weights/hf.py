"""Load a Hugging Face Llama folder: config.json and single or sharded safetensors, bf16/fp16/fp32.

safetensors files are read directly (an 8-byte header length, a JSON header, raw little-endian data), so
bf16 needs no framework: its 16 bits are the top half of an fp32.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from packkv.errors import PackkvError
from packkv.model.config import LlamaConfig

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise PackkvError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackkvError(f"cannot read {path}: {exc}") from exc


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise PackkvError(f"weights folder not found: {folder}")
    if not folder.is_dir():
        raise PackkvError(f"--weights must be a folder (config.json, *.safetensors, tokenizer.json): {folder}")
    return folder


def load_config(folder) -> LlamaConfig:
    return LlamaConfig.from_hf(read_json(check_folder(folder) / "config.json"))


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold, by its Hugging Face name, with its shape."""
    c = config
    hidden, d = c.hidden_size, c.head_dim
    q_out, kv_out = c.num_attention_heads * d, c.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, hidden)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_out, hidden),
            "self_attn.k_proj.weight": (kv_out, hidden),
            "self_attn.v_proj.weight": (kv_out, hidden),
            "self_attn.o_proj.weight": (hidden, q_out),
            "mlp.gate_proj.weight": (c.intermediate_size, hidden),
            "mlp.up_proj.weight": (c.intermediate_size, hidden),
            "mlp.down_proj.weight": (hidden, c.intermediate_size),
        }
        if c.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                          "self_attn.v_proj.bias": (kv_out,), "self_attn.o_proj.bias": (hidden,)})
        if c.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (c.intermediate_size,), "mlp.up_proj.bias": (c.intermediate_size,),
                          "mlp.down_proj.bias": (hidden,)})
        shapes.update({p + name: shape for name, shape in layer.items()})
    return shapes


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise PackkvError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")
    return found


def read_safetensors(path: Path, wanted) -> dict[str, np.ndarray]:
    """The tensors of one file whose names are in `wanted`, as fp32 or fp16 host arrays (memory-mapped)."""
    if not path.is_file():
        raise PackkvError(f"missing weights file: {path}")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except (OSError, ValueError, struct.error) as exc:
        raise PackkvError(f"cannot read safetensors file {path}: {exc}") from exc
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or name not in wanted:
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise PackkvError(f"{path.name}: tensor {name} has dtype {info['dtype']}; packkv reads F32, F16, BF16")
        start, end = info["data_offsets"]
        array = data[start:end].view(dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


def load_checkpoint(folder) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The config and every expected tensor, each checked for presence and shape (by name)."""
    folder = check_folder(folder)
    config = load_config(folder)
    expected = expected_tensors(config)
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        tensors.update(read_safetensors(path, expected))
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PackkvError(f"tensor {missing[0]} is missing from the checkpoint in {folder}{more}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise PackkvError(f"tensor {name} has shape {tuple(tensors[name].shape)}, the config implies {shape}")
    return config, tensors
