"""CUDA C kernels (loaded with cupy.RawModule) and the Numba CUDA cache encoder."""
