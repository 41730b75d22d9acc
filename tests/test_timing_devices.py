"""Timing on the device of the timed work, not the current one: runtime.time_cuda, bench.timing.CudaPhaseTimer,
bench.nvml.NvmlMonitor, checked on the CPU against a fake torch.cuda (current device 0, the work on cuda:1)."""

import sys
import time
import types

import pytest
import torch

from bench.nvml import NvmlMonitor
from bench.timing import CudaPhaseTimer
from fastlclip import runtime

WORK = torch.device("cuda", 1)


class FakeCuda:
    """A current device, one stream per device, events stamped with a clock that the timed work advances."""

    def __init__(self, monkeypatch, current: int = 0):
        self.current, self.clock, self.synced, self.calls = current, 0.0, [], []
        fake = self

        def index(d):
            if d is None:
                return fake.current
            return d if isinstance(d, int) else (torch.device(d).index if torch.device(d).index is not None else fake.current)

        class Event:
            def __init__(self, enable_timing=False):
                self.stream = self.t = None
                self.timing = enable_timing

            def record(self, stream=None):
                self.stream, self.t = stream if stream is not None else ("stream", fake.current), fake.clock

            def elapsed_time(self, end):
                if not (self.timing and end.timing):  # as CUDA: both events need enable_timing=True
                    raise RuntimeError("Both events must be created with argument 'enable_timing=True'")
                return end.t - self.t

        class device:
            def __init__(self, d):
                self.idx = index(d)

            def __enter__(self):
                self.prev, fake.current = fake.current, self.idx

            def __exit__(self, *exc):
                fake.current = self.prev

        self.Event = Event
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: ("stream", index(d)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: fake.synced.append(index(d)))

    def work(self, ms: float = 2.0):
        """The timed call: runs on whatever device is current, takes ``ms``."""
        self.calls.append(self.current)
        self.clock += ms


def test_time_cuda_times_on_the_given_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    events = []
    record = cuda.Event.record
    monkeypatch.setattr(cuda.Event, "record", lambda self, stream=None: (record(self, stream), events.append(self)))
    assert runtime.time_cuda(cuda.work, trials=3, steps=4, warmup=2, device=WORK) == 2.0
    assert cuda.calls == [1] * (2 + 3 * 4)
    assert {e.stream for e in events} == {("stream", 1)} and cuda.synced == [1]
    assert cuda.current == 0  # restored

    cuda.synced.clear()
    runtime.time_cuda(cuda.work, trials=1, steps=1, warmup=0)  # no device: the current one, as before
    assert cuda.synced == [0]


def test_phase_timer_records_on_the_work_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    timer = CudaPhaseTimer(WORK)
    timer.phase("unet_fwd")
    cuda.work(3.0)
    timer.phase("reward_fwd")
    cuda.work(1.0)
    timer.end_iteration()
    assert timer.durations_ms() == [{"unet_fwd": 3.0, "reward_fwd": 1.0}]
    assert {e.stream for _, e in timer._events[0]} == {("stream", 1)} and cuda.synced == [1]


class FakeNvml(types.ModuleType):
    """pynvml with one handle per PCI bus id; memory used and the energy counter per handle."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.inits = self.shutdowns = 0
        self.used = {"00000000:00:0A.0": 1 << 30, "00000000:00:0B.0": 5 << 30}
        self.energy = {"00000000:00:0A.0": 0, "00000000:00:0B.0": 0}

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        return bus

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.used[handle])

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.energy[handle] += 1000 if handle.endswith("0B.0") else 7
        return self.energy[handle]


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    props = {0: 0x0A, 1: 0x0B}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        pci_domain_id=0, pci_bus_id=0, pci_device_id=props[i], uuid=f"uuid-{i}"))
    return nvml


def test_nvml_monitor_reads_the_work_device(monkeypatch, fake_nvml):
    cuda = FakeCuda(monkeypatch)
    with NvmlMonitor(WORK, interval_s=0.001) as nvml:
        pass
    assert nvml.index == 1 and nvml.unavailable is None
    assert nvml.peak_used_bytes == 5 << 30 and nvml.energy_j == 1.0  # cuda:1's readings, not the current device's
    assert cuda.synced == [1]
    with NvmlMonitor("cuda:1") as by_name, NvmlMonitor(1) as by_index, NvmlMonitor() as current:
        pass
    assert by_name.index == by_index.index == 1 and current.index == 0


def test_nvml_monitor_shuts_down_and_reports_a_sampling_failure(monkeypatch, fake_nvml):
    FakeCuda(monkeypatch)
    with NvmlMonitor(WORK) as ok:
        pass
    assert fake_nvml.inits == fake_nvml.shutdowns == 1 and ok.unavailable is None

    calls = []

    def failing(handle):
        calls.append(handle)
        if len(calls) > 1:
            raise FakeNvml.NVMLError("GPU is lost")
        return types.SimpleNamespace(used=3 << 30)

    fake_nvml.nvmlDeviceGetMemoryInfo = failing
    with NvmlMonitor(WORK, interval_s=0.001) as broken:
        for _ in range(5000):  # until the sampling thread hits the error
            if len(calls) >= 2:
                break
            time.sleep(0.001)
    assert broken.peak_used_bytes is None  # not the partial peak of the samples before the error
    assert broken.unavailable == "NVML sampling failed: NVMLError: GPU is lost"
    assert broken.energy_j == 1.0 and fake_nvml.shutdowns == 2

    def no_device(bus):
        raise FakeNvml.NVMLError("not found")

    fake_nvml.nvmlDeviceGetHandleByPciBusId = no_device
    fake_nvml.nvmlDeviceGetHandleByUUID = no_device
    with NvmlMonitor(WORK) as missing:
        pass
    assert missing.unavailable == "NVML error: not found" and missing.peak_used_bytes is None
    assert fake_nvml.inits == fake_nvml.shutdowns == 3


def test_nvml_monitor_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with NvmlMonitor(1) as nvml:
        pass
    assert nvml.unavailable == "pynvml (nvidia-ml-py) not installed" and nvml.energy_j is None


def test_both_sides_of_a_comparison_are_timed_alike():
    """The pixel baselines skip the per-call NaN check (a host sync) as the Latent-CLIP rows do, and the NVML
    sampler polls slowly enough not to compete for the GIL with launch-bound loops."""
    import inspect

    from diffusers import AutoencoderKL

    from bench import rewards as bench_rewards, tiny

    vae = AutoencoderKL(**tiny.VAE)
    built = {key: bench_rewards.build(bench_rewards.REWARDS[key], vae=vae, device="cpu", dtype=torch.float32, smoke=True)
             for key in ("latent-b8", "pixel-b32", "taesd-b32")}
    assert built["latent-b8"].model.check_finite is False
    assert built["pixel-b32"].check_finite is False and built["taesd-b32"].check_finite is False
    assert inspect.signature(NvmlMonitor).parameters["interval_s"].default >= 0.05


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------
def test_time_cuda_defaults_are_3_warmup_calls_and_5_trials_of_20(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    assert runtime.time_cuda(cuda.work, device=WORK) == 2.0
    assert cuda.calls == [1] * (3 + 5 * 20)
