"""The Llama forward pass, written once against `xp` (NumPy on the CPU, CuPy on the GPU)."""
from packkv.model.config import LlamaConfig
from packkv.model.llama import Llama

__all__ = ["LlamaConfig", "Llama"]
