"""NVML readings for a CUDA device: its energy counter and a sampled peak of device memory used."""

from __future__ import annotations

import threading

import torch


def cuda_index(device: torch.device | str | int | None) -> int:
    """The index of CUDA ``device``; None or ``"cuda"`` without an index: the current device's."""
    if isinstance(device, int):
        return device
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"NVML readings need a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


class NvmlMonitor:
    """Context manager over a measured span: energy used (J) and the largest memory-used sample (bytes).

    Both are whole-device figures: memory includes the CUDA context, the caching allocator's reserve and
    any other process on the GPU. Unavailable readings stay None, with the reason in ``unavailable``.
    ``device``: the CUDA device the measured work runs on (a ``torch.device``, ``"cuda:1"`` or an index, e.g.
    ``generator.device``); None: the current device.
    """

    def __init__(self, device: torch.device | str | int | None = None, interval_s: float = 0.005):
        self.energy_j: float | None = None
        self.peak_used_bytes: int | None = None
        self.unavailable: str | None = None
        self._interval = interval_s
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start: int | None = None
        self.index: int = cuda_index(device)
        try:
            import pynvml
        except ImportError:
            self.unavailable = "pynvml (nvidia-ml-py) not installed"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._handle = self._find_handle(self.index)
        except pynvml.NVMLError as e:
            self.unavailable = f"NVML error: {e}"

    def _find_handle(self, index: int):
        props = torch.cuda.get_device_properties(index)
        try:
            return self._nvml.nvmlDeviceGetHandleByPciBusId(
                f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0")
        except (AttributeError, self._nvml.NVMLError):
            return self._nvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak_used_bytes = max(self.peak_used_bytes or 0, used)
            self._stop.wait(self._interval)

    def __enter__(self) -> "NvmlMonitor":
        if self._handle is None:
            return self
        try:
            self._energy_start = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError as e:
            self.unavailable = f"energy counter: {e}"
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        torch.cuda.synchronize(self.index)
        if self._energy_start is not None:
            self.energy_j = (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._energy_start) / 1000.0
        self._stop.set()
        self._thread.join()
