"""Launching our NVRTC-compiled kernels (`torch.cuda._compile_kernel`), with programmatic
dependent launch (PDL) where it is safe.

With PDL (sm_90+), a kernel may be scheduled while the previous kernel in the stream drains,
and waits for it (`griddepcontrol.wait` in the .cu) only before reading what that kernel wrote:
the GEMVs request their first weights first, so the fixed cost of each launch and the previous
kernel's last wave overlap. We use it only while a CUDA graph is being captured (the decode
step), where weights are constants of the graph; a plain launch outside a capture always sees a
weight written just before it. torch's kernel wrapper launches without attributes, so this
calls the driver's `cuLaunchKernelEx` itself.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch

# Switched off by benchmarks to measure what PDL gives.
use_pdl = True

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


def _c_arg(arg: torch.Tensor | int | float) -> ctypes.c_void_p | ctypes.c_int | ctypes.c_double:
    # As torch's launcher converts them: tensors to pointers, ints to int, floats to double.
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p(arg.data_ptr())
    return ctypes.c_int(arg) if isinstance(arg, int) else ctypes.c_double(arg)


def _launch_dependent(kernel: Callable[..., None], grid: Sequence[int], block: Sequence[int], args: list) -> None:
    values = [_c_arg(arg) for arg in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                           ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(attribute), 1)
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {result}")


def _dependent_here(device: int) -> bool:
    return (use_pdl and torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch(kernel: Callable[..., None], grid: Sequence[int], block: Sequence[int], args: list, device: int) -> None:
    """`kernel` on the current stream of `device` (the current device): dependent (PDL) inside
    a graph capture on sm_90+, plainly elsewhere."""
    if _dependent_here(device):
        _launch_dependent(kernel, grid, block, args)
    else:
        kernel(grid=tuple(grid), block=tuple(block), args=args)
