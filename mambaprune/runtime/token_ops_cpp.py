"""The alignment convs through the C++ CPU kernels (``csrc/token_ops.h``): ``pos_conv1d``, ``pos_conv2d``.

Same values as the composites in token_ops.py (up to the order of the float additions), forward
and backward, at a fraction of the cost: the composites issue a dozen torch ops per tap (conv1d)
or scatter to a dense grid and back (conv2d), which the CPU pays in dispatch and memory traffic.
The kernels build a (batch, K, taps) neighbour table from pos and run one channel-vectorised loop.

The ``mambaprune_cpu`` schemas and fake kernels are defined here, so a compiled backward can trace
them; the C++ library only adds their CPU kernels. ``cpu_conv_op`` says when they apply.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .cpu_kernels import load_cpu_kernels

torch.library.define(
    "mambaprune_cpu::pos_conv1d_forward", "(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int left) -> Tensor"
)
torch.library.define(
    "mambaprune_cpu::pos_conv1d_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor pos, int left) -> Tensor[]",
)
torch.library.define(
    "mambaprune_cpu::pos_conv2d_forward",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int height, int width, int padding) -> Tensor",
)
torch.library.define(
    "mambaprune_cpu::pos_conv2d_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor pos, int height, int width, int padding) -> Tensor[]",
)


@torch.library.register_fake("mambaprune_cpu::pos_conv1d_forward")
def _pos_conv1d_forward_fake(x, weight, bias, pos, left):
    return x.new_empty(x.shape)


@torch.library.register_fake("mambaprune_cpu::pos_conv2d_forward")
def _pos_conv2d_forward_fake(x, weight, bias, pos, height, width, padding):
    return x.new_empty(x.shape)


def _conv_backward_fake(grad_out, x, weight, pos, *sizes):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])]


torch.library.register_fake("mambaprune_cpu::pos_conv1d_backward", _conv_backward_fake)
torch.library.register_fake("mambaprune_cpu::pos_conv2d_backward", _conv_backward_fake)


def cpu_conv_op(name: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The C++ kernel ``torch.ops.mambaprune_cpu.<name>`` when it applies (CPU; x, weight and bias all
    float32 or all float64: other dtypes keep the composite's arithmetic; the kernels built), else None."""
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in _KERNEL_DTYPES or weight.dtype != dtype:
        return None
    if bias is not None and bias.dtype != dtype:
        return None
    return _cpu_op(name) if load_cpu_kernels() is not None else None


_KERNEL_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _cpu_op(name: str):
    return getattr(torch.ops.mambaprune_cpu, name).default


def conv_grads(grads, needs_input_grad, bias: Optional[torch.Tensor]) -> tuple:
    """The kernel's [x, weight, bias] gradients, None where not needed (or no bias)."""
    wanted = (needs_input_grad[0], needs_input_grad[1], needs_input_grad[2] and bias is not None)
    return tuple(g if want else None for g, want in zip(grads, wanted))
