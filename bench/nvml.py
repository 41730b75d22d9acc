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
    any other process on the GPU. Unavailable readings stay None, with the reason in ``unavailable``; a
    sampling thread that hits an NVML error stops, ``peak_used_bytes`` stays None (a partial peak is not
    reported) and ``unavailable`` says ``"NVML sampling failed: <reason>"``. NVML is initialised on entry and
    shut down on exit. ``device``: the CUDA device the measured work runs on (a ``torch.device``,
    ``"cuda:1"`` or an index, e.g. ``generator.device``); None: the current device. ``interval_s``: time
    between memory samples; the default 0.1 s keeps the sampling thread from taking the GIL from a
    launch-bound loop it measures (at 5 ms it competed with the kernel launches), and the allocator's own
    peak (``torch.cuda.max_memory_allocated``) stays the exact figure.
    """

    def __init__(self, device: torch.device | str | int | None = None, interval_s: float = 0.1):
        self.energy_j: float | None = None
        self.peak_used_bytes: int | None = None
        self.unavailable: str | None = None
        self.index: int = cuda_index(device)
        self._interval = interval_s
        self._nvml = None
        self._handle = None
        self._initialised = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start: int | None = None
        self._sampling_error: str | None = None
        try:
            import pynvml
        except ImportError:
            self.unavailable = "pynvml (nvidia-ml-py) not installed"
            return
        self._nvml = pynvml

    def _note(self, text: str) -> None:
        self.unavailable = f"{self.unavailable}; {text}" if self.unavailable else text

    def _find_handle(self, index: int):
        props = torch.cuda.get_device_properties(index)
        try:
            return self._nvml.nvmlDeviceGetHandleByPciBusId(
                f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0")
        except (AttributeError, self._nvml.NVMLError):
            return self._nvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")

    def _sample_once(self) -> None:
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self.peak_used_bytes = max(self.peak_used_bytes or 0, used)

    def _sample(self) -> None:
        try:
            while not self._stop.is_set():
                self._sample_once()
                self._stop.wait(self._interval)
        except Exception as e:  # noqa: BLE001 - reported in the result instead of dying silently with the thread
            self._sampling_error = f"{type(e).__name__}: {e}"

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                self._note(f"nvmlShutdown: {e}")

    def __enter__(self) -> "NvmlMonitor":
        if self._nvml is None:
            return self
        try:
            self._nvml.nvmlInit()
            self._initialised = True
            self._handle = self._find_handle(self.index)
        except self._nvml.NVMLError as e:
            self._note(f"NVML error: {e}")
            self._handle = None
            self._shutdown()
            return self
        try:
            self._energy_start = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError as e:
            self._note(f"energy counter: {e}")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        try:
            torch.cuda.synchronize(self.index)
            if self._energy_start is not None:
                try:
                    end = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                    self.energy_j = (end - self._energy_start) / 1000.0
                except self._nvml.NVMLError as e:
                    self._note(f"energy counter: {e}")
        finally:
            self._stop.set()
            self._thread.join()
            if self._sampling_error is None:
                try:
                    self._sample_once()  # one sample at the end: a span shorter than the interval still has one
                except Exception as e:  # noqa: BLE001
                    self._sampling_error = f"{type(e).__name__}: {e}"
            if self._sampling_error is not None:
                self.peak_used_bytes = None
                self._note(f"NVML sampling failed: {self._sampling_error}")
            self._shutdown()
