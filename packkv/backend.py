"""The one place that chooses the array library: CuPy on the GPU, NumPy on the CPU.

The model and the reference attention are written once against `xp`; this module decides which `xp`
that is, reports the device, and turns CUDA failures into messages a user can act on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packkv.errors import PackkvError


@dataclass(frozen=True)
class Backend:
    xp: object            # numpy or cupy
    device: str           # "cpu" or "gpu"
    device_name: str      # e.g. "CPU (numpy)" or "NVIDIA H100 80GB HBM3"
    dtype: object         # activation/weight dtype: float32 on the CPU, float16 on the GPU

    @property
    def is_gpu(self) -> bool:
        return self.device == "gpu"

    def to_numpy(self, array) -> np.ndarray:
        return array.get() if self.is_gpu else np.asarray(array)

    def synchronize(self) -> None:
        """Wait for all work on the device (every stream: the decode graph runs on its own)."""
        if self.is_gpu:
            self.xp.cuda.Device().synchronize()

    def peak_memory_bytes(self) -> int | None:
        """Bytes CuPy's memory pool holds on the device (None on the CPU). The pool keeps freed
        blocks for reuse and never shrinks on its own, so this is the peak of what packkv allocated."""
        if not self.is_gpu:
            return None
        return self.xp.get_default_memory_pool().total_bytes()


def gpu_problem() -> str | None:
    """Why the GPU cannot be used, or None when it can."""
    try:
        import cupy
    except ImportError as exc:  # not installed, or its CUDA libraries are missing
        return f"CuPy is not importable ({exc}); install it with: pip install 'packkv[gpu]'"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        cupy.zeros(1).sum().item()  # touches the driver, the context and a kernel compile
    except Exception as exc:  # cupy raises several unrelated types for a missing driver
        return f"CUDA is not usable ({type(exc).__name__}: {exc})"
    return None


def get_backend(device: str = "auto") -> Backend:
    """`device` is auto (GPU when usable, else CPU), cpu or gpu (an error when there is no usable GPU)."""
    if device not in ("auto", "cpu", "gpu"):
        raise PackkvError(f"--device must be auto, cpu or gpu, not {device!r}")
    if device != "cpu":
        problem = gpu_problem()
        if problem is None:
            import cupy
            name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
            return Backend(cupy, "gpu", name.decode() if isinstance(name, bytes) else name, np.float16)
        if device == "gpu":
            raise PackkvError(f"--device gpu was asked for, but {problem}")
    return Backend(np, "cpu", "CPU (numpy)", np.float32)


def out_of_memory_error(needed_bytes: int, what: str) -> PackkvError:
    """The message for a failed GPU allocation: how much was needed, and what is free."""
    free = total = 0
    try:
        import cupy
        free, total = cupy.cuda.runtime.memGetInfo()
    except Exception:
        pass
    return PackkvError(
        f"out of GPU memory: {what} needs {needed_bytes / 2**20:.1f} MiB, "
        f"{free / 2**20:.1f} MiB of {total / 2**20:.1f} MiB are free "
        "(try a smaller --max-context, a smaller model or --device cpu)")
