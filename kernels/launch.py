"""Shared plumbing for the Triton kernels: availability, fallback warnings, launch configs.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel, i.e. when this package is
imported: set ``TRITON_INTERPRET=1`` *before* importing ``fastlclip.kernels`` to run the kernels on
CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources, PTXASError

    HAS_TRITON = True
except ImportError:  # e.g. macOS wheels: the PyTorch paths still work.
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for ``triton`` / ``triton.language`` so the kernel modules import without Triton."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    OutOfResources = PTXASError = RuntimeError  # never raised without Triton


# Test hook: when True, kernel outputs are allocated filled with NaN, so an unwritten tile shows.
POISON = False

_WARNED: set[tuple[str, str]] = set()


def kernels_available(device) -> bool:
    """Whether the Triton kernels can run on ``device`` (a ``torch.device``, string or tensor).

    True for CUDA devices, and for CPU when ``TRITON_INTERPRET=1`` was set before import.
    """
    return _unavailable_reason(device) is None


def _unavailable_reason(device) -> str | None:
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if not HAS_TRITON:
        return "Triton is not installed"
    if (device.type == "cuda" and torch.cuda.is_available()) or (device.type == "cpu" and INTERPRET):
        return None
    if device.type == "cuda":
        return "torch.cuda.is_available() is False"
    if device.type != "cpu":
        return f"inputs are on {device.type}, which the Triton kernels do not support"
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return ("inputs are on cpu and TRITON_INTERPRET was set after fastlclip.kernels was imported "
                "(set it before the import)")
    return "no CUDA device and TRITON_INTERPRET is not set"


def warn_fallback(op: str, device) -> None:
    """Warn once per (op, reason) that ``op`` runs its PyTorch path on ``device``."""
    reason = _unavailable_reason(device) or "the Triton kernels are unavailable"
    if (op, reason) in _WARNED:
        return
    _WARNED.add((op, reason))
    warnings.warn(f"fastlclip.kernels.{op}: {reason}: using the PyTorch path", RuntimeWarning, stacklevel=3)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when the ``POISON`` test hook is on)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` (same layout) for kernel outputs, NaN-filled under ``POISON``."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON else out


def dot_args(dtype: torch.dtype) -> dict:
    """``tl.dot`` settings for operands of ``dtype``.

    fp32 uses IEEE products (no TF32), so fp32 results match PyTorch's default matmul. Under the
    interpreter, bf16 operands are upcast to fp32 because its bf16 ``tl.dot`` returns garbage.
    """
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": INTERPRET and dtype == torch.bfloat16}


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (see :func:`dot_args`)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# True when the kernels were decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = HAS_TRITON and type(dot).__name__ == "InterpretedFunction"


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter will fail with this NumPy, or None. Triton 3.6's interpreter fails with
    NumPy >= 2.4 (``TypeError: only 0-dimensional arrays can be converted to Python scalars`` at a
    ``range(0, K, ...)`` loop); 3.8's does not; 3.7 was not tried."""
    def version(text):
        return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())

    if version(triton_version) < (3, 7) and version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy_version}: "
                "install 'numpy<2.4', or Triton >= 3.8 (whose interpreter works with it)")
    return None


if INTERPRET:
    import numpy

    if _problem := interpreter_numpy_problem(triton.__version__, numpy.__version__):
        warnings.warn(_problem, RuntimeWarning, stacklevel=2)


class NoConfigFits(RuntimeError):
    """Every launch config of a kernel needs more shared memory or registers than this GPU has."""


# Test and precompile hook: when an int i, every Launcher runs its i-th fitting config (modulo their number)
# instead of autotuning, so that parallel processes can each compile one config (bench.precompile).
FORCE_CONFIG: int | None = None


class Launcher:
    """Launches a ``@triton.jit`` kernel with autotuned meta-parameters.

    On a GPU it autotunes over ``configs`` (no tuned table: none has been measured), keyed on the
    argument names in ``key`` and on ``size_hint`` (the parallel work, e.g. B * H) rounded up to a
    power of two, so a new batch size within the same bucket reuses the tuned config. Configs whose
    ``estimate(config, args)`` (estimated bytes of shared memory and 32-bit registers per thread, from
    the launch arguments by name) exceed the GPU's shared memory per block or the registers a thread
    can have without spilling are pruned before anything is compiled (``early_config_prune``). Under
    the interpreter (whose autotuner cannot benchmark) it uses the single ``interpreter_config`` (block
    sizes only). ``grid`` is a callable of the meta-parameter dict. Autotuning benchmarks on the first
    launch of each key: run once before capturing a CUDA graph.
    """

    def __init__(self, kernel, configs: list[dict], key: list[str], interpreter_config: dict,
                 estimate: Callable[[dict, dict], tuple[int, int]] | None = None, keep_smallest: bool = False):
        self.kernel = kernel
        self.configs = configs
        self.key = key
        self.interpreter_config = interpreter_config
        self.estimate = estimate
        self.keep_smallest = keep_smallest
        self._tuned: dict[tuple, object] = {}

    def fitting(self, args: dict, shared_limit: int) -> list[dict]:
        """The configs whose estimated shared memory and registers fit (see :func:`fits`); when none does and
        ``keep_smallest`` (a kernel without a fallback), the one with the least estimated shared memory, which
        the compiler and the loader then judge."""
        if self.estimate is None:
            return list(self.configs)
        kept = [c for c in self.configs if fits(*self.estimate(c, args), c.get("num_warps", 4), shared_limit)]
        if not kept and self.keep_smallest:
            kept = [min(self.configs, key=lambda c: self.estimate(c, args))]
        return kept

    def _prune(self, device: torch.device):
        limit = max_shared_memory(device.index)
        name = getattr(self.kernel, "__name__", "the kernel")

        def early_config_prune(configs, named_args, **kwargs):
            fitting = self.fitting({**named_args, **kwargs}, limit)
            kept = [c for c in configs if _as_dict(c) in fitting]
            if not kept:
                raise NoConfigFits(f"no launch config of {name} fits {_gpu_name(device.index)}: every config's "
                                   f"estimated shared memory or registers exceed it ({limit} bytes of shared memory)")
            return kept
        return early_config_prune

    def __call__(self, grid: Callable[[dict], tuple], device: torch.device, *args, size_hint: int, **kwargs) -> dict:
        """Launches the kernel; returns the meta-parameters (block sizes) it ran with."""
        if INTERPRET:
            meta = self.interpreter_config
            self.kernel[grid({**kwargs, **meta})](*args, **kwargs, **meta)
            return meta
        with torch.cuda.device(device):
            try:
                if FORCE_CONFIG is not None:
                    tuner = self._forced(device, dict(zip(self.kernel.arg_names, args)) | kwargs)
                else:
                    tuner = self._autotuner(device, triton.next_power_of_2(size_hint))
                tuner[grid](*args, **kwargs)
                return tuner.best_config.kwargs
            except (OutOfResources, PTXASError) as e:  # the autotuner skips such configs; here every one failed
                name = getattr(self.kernel, "__name__", "the kernel")
                raise NoConfigFits(f"no launch config of {name} fits {_gpu_name(device.index)}: {e}") from e

    def _autotuner(self, device: torch.device, bucket: int):
        gpu = _gpu_name(device.index)
        if (gpu, bucket) not in self._tuned:
            prune = {"early_config_prune": self._prune(device)} if self.estimate is not None else None
            self._tuned[gpu, bucket] = triton.autotune([_to_config(c) for c in self.configs], key=self.key,
                                                       prune_configs_by=prune)(self.kernel)
        return self._tuned[gpu, bucket]

    def _forced(self, device: torch.device, args: dict):
        """A one-config autotuner (it launches without benchmarking) for config ``FORCE_CONFIG``."""
        candidates = self.fitting(args, max_shared_memory(device.index)) or self.configs
        config = candidates[FORCE_CONFIG % len(candidates)]
        key = ("forced", _gpu_name(device.index), tuple(sorted(config.items())))
        if key not in self._tuned:
            self._tuned[key] = triton.autotune([_to_config(config)], key=self.key)(self.kernel)
        return self._tuned[key]


# Registers a thread may hold: 255, and 64 Ki per block (sm_80 .. sm_90) shared by its threads.
MAX_REGISTERS = 255
REGISTERS_PER_BLOCK = 65536


def fits(shared_bytes: int, registers: int, num_warps: int, shared_limit: int) -> bool:
    """Whether an estimate of shared memory (bytes) and registers per thread fits ``shared_limit`` and the
    registers a thread of a ``num_warps`` block can have (the estimate carries its own margin)."""
    return shared_bytes <= shared_limit and registers <= min(MAX_REGISTERS, REGISTERS_PER_BLOCK // (32 * num_warps))


@functools.cache
def max_shared_memory(index: int) -> int:
    """Shared memory one block may use on CUDA device ``index`` (opt-in maximum), in bytes."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def element_size(arg) -> int:
    """Bytes per element of a tensor argument (4 for anything else)."""
    return arg.element_size() if isinstance(arg, torch.Tensor) else 4


def _as_dict(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _to_config(config: dict):
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
