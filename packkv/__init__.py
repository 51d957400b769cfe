"""packkv: Llama-family inference on CuPy/NumPy with a PackKV-compressed KV cache."""

__version__ = "0.1.0"
