"""GPU-only tests: every test here is marked ``gpu`` and skipped without CUDA or with interpreted kernels."""

import pytest
import torch


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    from fastlclip.kernels import launch

    if launch.INTERPRET:
        return ("TRITON_INTERPRET=1 was set when fastlclip.kernels was imported: "
                "run the GPU suite without it (pytest tests/gpu -m gpu)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if "/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
