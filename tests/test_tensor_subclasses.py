"""Tensor subclasses that only restate a tensor's properties are read as plain tensors during a capture
(capture/tensor_subclasses.py); any other subclass is left as it is, and the globals are put back."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from mambaprune.capture.tensor_subclasses import _restates, plain_tensor_subclasses

THIS = sys.modules[__name__]


class IntShape(torch.Tensor):          # VSSD's tTensor
    @property
    def shape(self):
        return tuple(int(s) for s in super().shape)


class LyingShape(torch.Tensor):
    @property
    def shape(self):
        return tuple(int(s) + 1 for s in super().shape)


class WithMethod(torch.Tensor):
    @property
    def shape(self):
        return tuple(int(s) for s in super().shape)

    def double(self):
        return self * 2


class Wrapping(nn.Module):
    def forward(self, x):
        return IntShape(x) * 2


def test_only_subclasses_whose_properties_agree_with_torch_tensor_are_read_as_plain():
    assert _restates(IntShape)
    assert not _restates(LyingShape)
    assert not _restates(WithMethod)
    assert not _restates(torch.Tensor) and not _restates(torch.nn.Parameter)


def test_the_global_holds_a_stand_in_during_the_block_and_the_class_afterwards():
    model, original = Wrapping(), IntShape
    with plain_tensor_subclasses(model) as unwrapped:
        assert THIS.IntShape is not original
        y = model(torch.ones(2, 3))
        assert type(y) is torch.Tensor and torch.equal(y, torch.full((2, 3), 2.0))
        assert [u.name for u in unwrapped] == [f"{__name__}.IntShape"]
        assert THIS.LyingShape is LyingShape and THIS.WithMethod is WithMethod
    assert THIS.IntShape is original and isinstance(model(torch.ones(2, 3)), IntShape)


def test_a_model_wrapping_its_tensors_is_captured():
    from mambaprune.capture.capture import capture
    captured = capture(Wrapping(), (torch.randn(2, 3),))
    x = torch.randn(4, 3)
    torch.testing.assert_close(captured.gm(x), x * 2)
    assert [u.name for u in captured.unwrapped] == [f"{__name__}.IntShape"]
