"""Weights in Hugging Face layout (config.json, *.safetensors, tokenizer.json), GGUF import, the default model."""
from packkv.weights.hf import load_checkpoint, load_config, expected_tensors
from packkv.weights.tokenizer import Tokenizer

__all__ = ["load_checkpoint", "load_config", "expected_tensors", "Tokenizer"]
