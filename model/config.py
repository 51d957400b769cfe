"""The model's hyperparameters, read from a Hugging Face config.json (or built in memory)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from packkv.errors import PackkvError

SUPPORTED_ROPE_SCALINGS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA); 1 for plain multi-head attention."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """Read a transformers LlamaConfig dict; refuse what this engine does not implement."""
        arch = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
            raise PackkvError(f"unsupported architecture {arch[0]!r} (model_type "
                              f"{cfg.get('model_type')!r}): packkv runs Llama-family models (model_type 'llama')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise PackkvError(f"config.json has no {key!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise PackkvError(f"unsupported hidden_act {cfg['hidden_act']!r}: packkv implements SwiGLU (silu)")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise PackkvError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        # transformers 4 writes rope_theta and rope_scaling; transformers 5 one rope_parameters dict.
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_SCALINGS:
                raise PackkvError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_SCALINGS)})")
            scaling = dict(scaling, rope_type=kind)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def rope_inverse_frequencies(self) -> np.ndarray:
        """Per rotary pair, the angle per position (float64), with linear or llama3 scaling applied."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            return inv_freq / scaling["factor"]
        if kind == "llama3":
            return _llama3_scaled(inv_freq, scaling)
        return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(is_medium, blended, scaled)
