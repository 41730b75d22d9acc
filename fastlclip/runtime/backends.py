"""The one place that attaches fast paths to a plain :class:`~fastlclip.model.LatentCLIP`: the concrete
backends, and :func:`install` for a runtime built by hand."""

from __future__ import annotations

import warnings

from ..kernels import launch
from ..model import LatentCLIP
from .common import Runtime, use_kernels, warn
from .compiled import CompiledRuntime
from .graph import GraphRuntime

# Concrete backends; "auto" (fastlclip.runtime.apply) picks one of them.
BACKENDS = ("eager", "triton", "graph", "compile")


def install(model: LatentCLIP, runtime: Runtime | None) -> LatentCLIP:
    """Make ``runtime`` run ``model``'s image tower (its ``forward`` rebound to ``runtime.encode``, the
    tower's weights frozen), or, with None, return the model to plain eager PyTorch."""
    if runtime is not None and runtime.model is not model:
        raise ValueError("this runtime was built for another model")
    tower = model.visual.latent_vit
    use_kernels(model, False)
    tower.__dict__.pop("forward", None)
    if runtime is not None:
        tower.requires_grad_(False)
        use_kernels(tower, runtime.fused)
        tower.forward = runtime.encode
    model.runtime = runtime
    model.backend = runtime.backend if runtime is not None else "eager"
    return model


def activate(model: LatentCLIP, backend: str, **options) -> LatentCLIP:
    """Set one of :data:`BACKENDS` on ``model``; ``options`` go to the runtime's constructor."""
    if backend in ("eager", "triton"):
        if options:
            raise TypeError(f"backend {backend!r} takes no options, got {sorted(options)}")
        install(model, None)
        if backend == "triton":
            if not launch.kernels_available(model.device):
                warnings.warn(
                    f"backend='triton' on {model.device}: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
                    "set before importing fastlclip to run on CPU; the model runs the equivalent PyTorch paths",
                    RuntimeWarning, stacklevel=4,
                )
            use_kernels(model, True)
            model.backend = "triton"
        return model
    if model.device.type != "cuda":
        what = "CUDA graphs need" if backend == "graph" else "the 'compile' backend is built for"
        warn(f"backend={backend!r}: {what} a CUDA device (the model is on {model.device}): using the eager backend")
        return install(model, None)
    runtime = GraphRuntime(model, **options) if backend == "graph" else CompiledRuntime(model, **options)
    return install(model, runtime)
