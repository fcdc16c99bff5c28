"""capture/batch_int.py: int() of an affine function of the batch stays symbolic during capture."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mambaprune.capture import capture


class Windows(nn.Module):
    """Splits every sample in two windows and puts them back with the batch computed by int(...)."""

    def __init__(self, batch_of):
        super().__init__()
        self.batch_of = batch_of

    def forward(self, x):                      # (B, 4, 8)
        windows = x.reshape(-1, 2, 8) * 2      # (2B, 2, 8)
        return windows.reshape(self.batch_of(windows.shape[0]), 4, 8) + 1


def as_mambavision(n):
    return int(n / (4 * 4 / 2 / 4))           # n / 2.0, as window_reverse's float arithmetic


def with_offset(n):
    return int((n + 2) / 2) - 1               # (2B + 2) / 2 - 1 = B: an offset and a division


def by_floor(n):
    return math.floor(n / 2)                  # not int(): not routed, the batch is fixed


@pytest.mark.parametrize("batch_of", [as_mambavision, with_offset])
def test_int_of_the_batch_keeps_the_capture_dynamic(batch_of):
    model = Windows(batch_of)
    captured = capture(model, (torch.randn(3, 4, 8),))
    assert captured.static_batch is None
    for batch in (1, 2, 3, 5):
        x = torch.randn(batch, 4, 8)
        assert torch.equal(captured.gm(x), model(x))


def test_a_batch_fixed_another_way_is_captured_with_the_example_batch():
    captured = capture(Windows(by_floor), (torch.randn(3, 4, 8),))
    assert captured.static_batch == 3


def test_the_builtin_is_restored_and_untouched_outside_a_capture():
    import sys
    capture(Windows(as_mambavision), (torch.randn(2, 4, 8),))
    assert "int" not in vars(sys.modules[__name__]) and int(7.9) == 7 and int("12", 8) == 10
