"""Random-weight models of real shapes, built in memory on the device (never written out), for benchmarks
that need a model's shapes and bytes, not its knowledge: Llama-3.1-8B, Llama-2-7B, TinyLlama-1.1B,
SmolLM2-135M (timing the default model without its weights), or any config.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from packkv.errors import PackkvError
from packkv.model.config import LlamaConfig
from packkv.weights.hf import expected_tensors

PRESETS = {
    "llama-3.1-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "llama-2-7b": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "tinyllama-1.1b": {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "smollm2-135m": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2},
}


def random_config(name_or_path: str) -> LlamaConfig:
    """A preset's name, or the path of a config.json."""
    if name_or_path in PRESETS:
        return LlamaConfig.from_hf({"model_type": "llama", **PRESETS[name_or_path]})
    path = Path(name_or_path)
    if not path.is_file():
        raise PackkvError(f"--random-weights takes {', '.join(PRESETS)} or a config.json path, not {name_or_path!r}")
    return LlamaConfig.from_hf(json.loads(path.read_text()))


class RandomTensors:
    """A mapping from the checkpoint's tensor names to random arrays made on first access on the device
    (norm weights are ones; matrices ~ N(0, 0.02), as at initialisation), in `dtype`."""

    def __init__(self, config: LlamaConfig, xp, dtype, seed: int = 0):
        self.shapes, self.xp, self.dtype = expected_tensors(config), xp, dtype
        self.rng = xp.random.default_rng(seed)

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str):
        shape = self.shapes[name]
        if len(shape) == 1:
            return self.xp.ones(shape, dtype=self.dtype) if name.endswith("norm.weight") else \
                self.xp.zeros(shape, dtype=self.dtype)
        out = self.rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(0.02)
        return out.astype(self.dtype)

    def keys(self):
        return self.shapes.keys()
