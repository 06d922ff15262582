"""Board energy and SM clock of one CUDA device, read from NVML (the driver's ``libnvidia-ml.so.1``) through ctypes:
no Python package needed, and ``None`` where there is no NVIDIA driver (CPU machines) or the GPU does not count
energy (before Volta).

An H100 / H200 runs the experts' matmuls at its power limit, where clocks fall to what the limit allows
(benchmarks/NOTES.md, v2.10 item 4): two kernels with the same FLOPs can then differ in time only by the energy they
spend per FLOP (bytes moved, registers, shared memory). Joules per call and the mean SM clock over a timed window say
which of the two a change moved.

The energy counter is the board's, in millijoules since the driver loaded; NVML refreshes it every few tens of
milliseconds, so a one-second window reads to within a few percent.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

NVML_SUCCESS = 0
NVML_CLOCK_SM = 1


class Window(NamedTuple):
    """What a timed window of ``calls`` calls spent: joules per call, mean board watts, mean SM clock in MHz."""

    joules_per_call: float
    watts: float
    sm_mhz: float


class EnergyMeter:
    """One GPU's energy counter and SM clock (``open`` returns ``None`` where NVML cannot read them)."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p):
        self._lib, self._handle = lib, handle

    @classmethod
    def open(cls, device: int | None = None) -> EnergyMeter | None:
        """The meter of CUDA device ``device`` (the current one by default), found by PCI bus id so that
        ``CUDA_VISIBLE_DEVICES`` renumbering does not matter; ``None`` without a driver, a GPU, or energy counting."""
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0".encode()
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            handle = ctypes.c_void_p()
            if lib.nvmlInit_v2() != NVML_SUCCESS:
                return None
            if lib.nvmlDeviceGetHandleByPciBusId_v2(ctypes.c_char_p(bus_id), ctypes.byref(handle)) != NVML_SUCCESS:
                return None
            meter = cls(lib, handle)
            return meter if meter.energy_mj() is not None else None
        except (OSError, AttributeError, RuntimeError):  # no driver, an older NVML without these entry points
            return None

    def energy_mj(self) -> int | None:
        """The board's energy counter, millijoules (``None`` if NVML refuses: no energy counting on this GPU)."""
        value = ctypes.c_ulonglong()
        status = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value))
        return value.value if status == NVML_SUCCESS else None

    def sm_mhz(self) -> int | None:
        """The SM clock now, MHz."""
        value = ctypes.c_uint()
        status = self._lib.nvmlDeviceGetClockInfo(self._handle, NVML_CLOCK_SM, ctypes.byref(value))
        return value.value if status == NVML_SUCCESS else None


def window(start_mj: int, end_mj: int, seconds: float, calls: int, clocks: list[int]) -> Window:
    """A timed window's figures from its two energy readings, its wall seconds, its calls and its clock samples."""
    if calls <= 0 or seconds <= 0:
        raise ValueError(f"a window needs calls > 0 and seconds > 0 (got {calls}, {seconds})")
    joules = (end_mj - start_mj) / 1e3
    mean_mhz = sum(clocks) / len(clocks) if clocks else float("nan")
    return Window(joules / calls, joules / seconds, mean_mhz)
