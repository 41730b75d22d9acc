"""The agreement rules of the GPU checks, on the CPU: ``bench.rewards.agreement`` (auto's backend choice, the
reward benchmark) and ``conftest.assert_rows_close`` (the kernel benchmarks)."""

import pytest
import torch

from bench.rewards import AGREEMENT, agreement
from conftest import ROW_TOL, assert_rows_close


def test_agreement_takes_bf16_rounding_and_refuses_a_loss_off_by_one():
    torch.manual_seed(0)
    grad = torch.randn(1, 4, 64, 64)
    bf16 = grad.bfloat16().float()  # a gradient rounded to bf16
    scale = 1 / 0.07  # random weights' logit scale (14.3); trained checkpoints have 100
    ok, _ = agreement(85.0 + 1e-3 * scale, 85.0, bf16, grad, scale, torch.bfloat16)  # cosine off by 1e-3
    assert ok
    for s in (scale, 100.0):  # the old bound let a loss off by 1.0 pass: 0.07 or 0.01 in cosine
        ok, figures = agreement(85.0 + 1.0, 85.0, grad, grad, s, torch.bfloat16)
        assert not ok and "cosine off by" in figures
    assert agreement(85.0, 85.0, grad, grad, scale, torch.float32)[0]  # identical: agrees
    ok, figures = agreement(85.0 + 1e-3 * scale, 85.0, grad, grad, scale, torch.float32)  # fine in bf16, not fp32
    assert not ok
    flipped = grad.clone()
    flipped[..., :8, :] *= -1  # an eighth of the gradient reversed: cosine 0.75
    assert not agreement(85.0, 85.0, flipped, grad, scale, torch.bfloat16)[0]
    assert AGREEMENT[torch.float32] == (1e-4, 0.9999) and AGREEMENT[torch.bfloat16] == (5e-3, 0.99)


def test_rows_close_catches_a_scale_and_one_wrong_row_that_a_global_cosine_passes():
    torch.manual_seed(0)
    want = torch.randn(8, 257, 768, dtype=torch.float64)
    assert_rows_close(want.bfloat16(), want, "bf16 rounding", ROW_TOL[torch.bfloat16])
    one_row = want.clone()
    one_row[3, 100] = torch.randn(768, dtype=torch.float64)  # one row of 2,056 wrong
    scaled = want * 1.05  # a wrong scale
    for bad in (one_row, scaled):
        cos = torch.nn.functional.cosine_similarity(bad.flatten(), want.flatten(), dim=0).item()
        assert cos >= 0.999  # what the old check accepted
        with pytest.raises(AssertionError, match="row"):
            assert_rows_close(bad.bfloat16(), want, "bad", ROW_TOL[torch.bfloat16])
