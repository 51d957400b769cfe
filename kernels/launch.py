"""How the CUDA C kernels of kernels/ are built and launched (CuPy RawModule), for every launcher.

    kernel_source(file)                          the .cu file as nvrtc gets it (local includes inlined)
    launch(kernel, grid, block, args, shared_mem) a RawKernel launch
    knocked_out(*names)                          launches skipped by name (bench/knockout.py)

A captured decode step is a chain of small dependent kernels (SmolLM2: ~7 per layer), and in a graph the
time between one kernel draining and the next one's CTAs running is a fixed cost per kernel. So while the
current stream is being captured, `launch` makes a programmatic dependent launch (cuLaunchKernelEx with
PROGRAMMATIC_STREAM_SERIALIZATION, sm_90): the kernel's CTAs are scheduled while the previous kernel
finishes, and wait inside (wait_for_previous_kernel, launch.cuh) until it has. Every kernel launched here
opens with that wait. Eager launches stay plain CuPy calls: there the host's launch cost dominates, and
building the extended launch's arguments in Python would only add to it. PDL = False turns it off (a
benchmark's side-by-side switch); it is read when a graph is captured.
"""
from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent
PDL = True
_PROGRAMMATIC_STREAM_SERIALIZATION = 6        # CUlaunchAttributeID
_knocked_out: dict[str, int] = {}             # knocked_out's names -> launches skipped


def kernel_source(name: str) -> str:
    """A .cu file with its local #include "x.cuh" inlined (nvrtc gets one string, no include path)."""
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = re.sub(r"^#pragma once\s*$", "", (KERNEL_DIR / file).read_text(), flags=re.M)
        return re.sub(r'^#include "([^"]+)"\s*$', lambda m: expand(m.group(1)), text, flags=re.M)

    return expand(name)


def launch(kernel, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    """kernel(grid, block, args, shared_mem=...), as a programmatic dependent launch while the current
    stream is being captured (see the module's doc). kernel: a cupy.RawKernel that opens with
    wait_for_previous_kernel()."""
    import cupy
    if _knocked_out:
        skipped = [name for name in _knocked_out if name in kernel.name]
        for name in skipped:
            _knocked_out[name] += 1
        if skipped:
            return
    stream = cupy.cuda.get_current_stream()
    if not (PDL and stream.is_capturing()):
        kernel(grid, block, args, shared_mem=shared_mem)
        return
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1                                    # programmaticStreamSerializationAllowed
    config = _LaunchConfig(*_dim3(grid), *_dim3(block), shared_mem, stream.ptr, ctypes.pointer(attribute), 1)
    values = kernel_params(args)
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    status = _libcuda().cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(kernel.kernel.ptr), pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx of {kernel.name} failed with CUresult {status}")


@contextmanager
def knocked_out(*names: str):
    """Within it, launch() skips every kernel whose name contains one of `names` (a nested call's names
    replace the outer ones until it ends): a decode step captured so runs without them, and its graph's time
    against the whole step's is what they cost inside it (bench/knockout.py). What the step computes is then
    garbage; only its time means anything. Yields {name: launches skipped}, so a caller can tell a name
    that matched nothing (a kernel renamed, or launched another way) from one that cost nothing."""
    global _knocked_out
    before, _knocked_out = _knocked_out, dict.fromkeys(names, 0)
    try:
        yield _knocked_out
    finally:
        _knocked_out = before


def kernel_params(args: tuple) -> list:
    """The launch's arguments as the C values the kernel's parameters take: device arrays as pointers,
    NumPy scalars as their own type (the launchers pass every scalar as one, as CuPy's launch wants)."""
    values = []
    for i, arg in enumerate(args):
        pointer = getattr(getattr(arg, "data", None), "ptr", None)      # a CuPy array's device address
        if isinstance(pointer, int):
            values.append(ctypes.c_uint64(pointer))
        elif isinstance(arg, np.generic) and arg.dtype in _C_TYPES:
            values.append(_C_TYPES[arg.dtype](arg.item()))
        else:
            raise TypeError(f"kernel argument {i} is a {type(arg).__name__}: launch takes CuPy arrays and NumPy "
                            f"scalars of {', '.join(str(t) for t in _C_TYPES)}")
    return values


_C_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.float32): ctypes.c_float}


class _LaunchAttribute(ctypes.Structure):            # CUlaunchAttribute: an id and a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):               # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attributes", ctypes.POINTER(_LaunchAttribute)), ("n_attributes", ctypes.c_uint)]


def _dim3(dims: tuple) -> tuple[int, int, int]:
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


@lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")
