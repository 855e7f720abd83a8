"""A Triton driver for measuring host time on a machine without a GPU: kernels compile for
sm_90a as on an H100 (ptxas included), every launch goes through Triton's whole host path
(JITFunction.run, or the compiled kernel's launcher), and the launcher itself does nothing.

    from host_driver import use_host_driver
    driver = use_host_driver()   # then call the fused path on CPU tensors; driver.launches counts

Used by bench/test_host_overhead.py and tests/test_launch_cache.py, on machines without a GPU
only: what it compiles stays in Triton's caches as device 0's, so a process that has used it
must not launch on a real device 0.  Never with TRITON_INTERPRET (the interpreter's kernels
launch without a driver).
"""
from __future__ import annotations

import zlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _Utils:
    def get_device_properties(self, device):  # an H100 SXM's, as CUDA reports them
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        # module, function (one number per binary: a launch shows which compile it ran), registers,
        # spills, max threads
        return object(), zlib.crc32(name.encode() + kernel), 64, 0, 1024

    def unload_module(self, module):
        pass


class HostDriver:
    """The active Triton driver's interface, for device 0 of an sm_90a GPU; `launches` counts the
    launches, `last` holds the latest's grid, function (a number per compiled binary) and
    arguments."""

    utils = _Utils()

    def __init__(self):
        self.launches = 0
        self.last: tuple = ()

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def launcher_cls(self, src, metadata):
        def launch(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                   exit_hook, *args):
            self.launches += 1
            self.last = ((grid_0, grid_1, grid_2), function, *args)

        return launch


def use_host_driver() -> HostDriver:
    """Make a HostDriver Triton's active driver (for the rest of the process) and return it."""
    host = HostDriver()
    driver.set_active(host)
    return host
