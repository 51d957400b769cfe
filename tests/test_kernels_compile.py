"""Every CUDA source in kernels/ compiles with nvcc for sm_90 (CPU: no GPU needed; skipped only where nvcc
is absent, and CI has it), and the packkv kernels' nvrtc sources (local includes inlined) are self-contained."""
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    result = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, cwd=KERNELS)
    assert result.returncode == 0, f"{source.name} does not compile:\n{result.stderr[-4000:]}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_inlined_nvrtc_source_compiles(tmp_path):
    """What the launchers hand nvrtc: one string per file, local includes inlined, no include path."""
    from packkv.kernels.launch import kernel_source
    src = tmp_path / "inlined.cu"
    src.write_text(kernel_source("packkv_gemv.cu"))
    assert "#include" not in src.read_text()
    result = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_kernel_params_are_the_c_values_and_refuse_python_numbers():
    import ctypes

    import numpy as np

    from packkv.kernels.launch import kernel_params

    class DeviceArray:                     # what launch reads of a CuPy array: its device address
        class data:
            ptr = 0x7f0000001000
    values = kernel_params((DeviceArray(), np.int32(-3), np.int64(1 << 40), np.uintp(0), np.float32(0.5)))
    assert [type(v) for v in values] == [ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64,
                                         ctypes.c_float]
    assert [v.value for v in values] == [0x7f0000001000, -3, 1 << 40, 0, 0.5]
    for wrong in (3, 0.5, np.float64(0.5), np.zeros(2)):
        with pytest.raises(TypeError, match="kernel argument 0"):
            kernel_params((wrong,))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_host_geometry_mirrors_the_device_macros(tmp_path):
    """attention_kernels sizes shared memory and splits with copies of the split kernels' layout macros and
    launch bounds (packkv_common.cuh, packkv_split.cuh): a host program prints the device values."""
    from packkv.kernels import attention_kernels as ak
    names = {"PK_WARP_EXTRA(1)": ak.warp_extra(1), "PK_WARP_EXTRA(2)": ak.warp_extra(2),
             **{f"PK_CTA_Q_PER_TILE({m})": ak.CTA_Q_PER_TILE[m] for m in range(3)},
             **{f"PK_WORK_PER_TILE({m})": ak.WORK_PER_TILE[m] for m in range(3)},
             "PK_META_SLOT_BYTES": ak.META_SLOT_BYTES, "PK_PBUF_BYTES": ak.PBUF_BYTES, "PK_WARPS": ak.WARPS,
             "PK_CTA_EXTRA": ak.TILE_CTA_EXTRA, "PK_TILE_WORK_PER_TILE": ak.TILE_WORK_PER_TILE,
             "PK_MINB": ak.CTAS_PER_SM[1], "PK_MINB_2SLOTS": ak.CTAS_PER_SM[2],
             "PK_MINB_TILES": ak.TILE_CTAS_PER_SM, "PK_MINB_GEMV": ak.GEMV_CTAS_PER_SM}
    prints = "".join(f'  std::printf("%d\\n", int({name}));\n' for name in names)
    (tmp_path / "geometry.cu").write_text(f'#include "packkv_split.cuh"\n#include <cstdio>\nint main() {{\n{prints}}}\n')
    exe = tmp_path / "geometry"
    built = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", f"-I{KERNELS}", str(tmp_path / "geometry.cu"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    device = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert dict(zip(names, map(int, device))) == names
