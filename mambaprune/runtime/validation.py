"""Argument checks for the runtime ops, run by the Python wrappers before the custom ops.

The custom ops themselves trust their inputs (a bad shape deep inside a chunked scan or a Triton
kernel gives an unreadable error or silent garbage), so every public wrapper validates first and
raises ``ValueError`` naming the argument and the shape it expected.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def require_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor; got {type(value).__name__}")


def require_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        _fail(op, f"{name} must be a floating-point tensor; got dtype {t.dtype}")


def require_int64(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int64:
        _fail(op, f"{name} must be an int64 tensor; got dtype {t.dtype}")


def require_same_device(op: str, reference_name: str, reference: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t is not None and t.device != reference.device:
            _fail(
                op,
                f"all tensors must be on the device of {reference_name} ({reference.device}); "
                f"{name} is on {t.device}",
            )


def require_shape(op: str, name: str, t: torch.Tensor, expected: Sequence, description: str) -> None:
    """Raise unless t.shape == expected; description spells the axes, e.g. '(batch, D, L)'."""
    if t.dim() != len(expected) or any(a != b for a, b in zip(t.shape, expected)):
        _fail(op, f"{name} must have shape {description} = {tuple(expected)}; got {_shape(t)}")


def require_rank(op: str, name: str, t: torch.Tensor, rank: int, description: str) -> None:
    if t.dim() != rank:
        _fail(op, f"{name} must have shape {description} ({rank} dims); got {_shape(t)}")


# ----------------------------------------------------------------------------- selective scan

_SCAN = "selective_scan"


def _check_scan_input_projection(name: str, t: torch.Tensor, batch, dim, dstate, length) -> None:
    """B or C: (batch, N, L) or grouped (batch, G, N, L) with G dividing D."""
    ok = False
    if t.dim() == 3:
        ok = tuple(t.shape) == (batch, dstate, length)
    elif t.dim() == 4:
        groups = t.shape[1]
        ok = (
            groups > 0
            and dim % groups == 0
            and (t.shape[0], t.shape[2], t.shape[3]) == (batch, dstate, length)
        )
    if not ok:
        _fail(
            _SCAN,
            f"{name} must have shape (batch, N, L) = {(batch, dstate, length)} or (batch, G, N, L) "
            f"with G dividing D={dim}; got {_shape(t)}",
        )


def check_selective_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    gap: Optional[torch.Tensor],
) -> None:
    """Validate the arguments of ``selective_scan`` (see its docstring for the layouts)."""
    required = {"u": u, "delta": delta, "A": A, "B": B, "C": C}
    optional = {"D": D, "z": z, "delta_bias": delta_bias, "gap": gap}
    for name, value in required.items():
        require_tensor(_SCAN, name, value)
    for name, value in optional.items():
        if value is not None:
            require_tensor(_SCAN, name, value)
    for name, value in {**required, "D": D, "z": z, "delta_bias": delta_bias}.items():
        if value is not None:
            require_floating(_SCAN, name, value)
    if gap is not None and (gap.dtype == torch.bool or gap.is_complex()):
        _fail(_SCAN, f"gap must be a real floating-point or integer tensor; got dtype {gap.dtype}")
    require_same_device(_SCAN, "u", u, {**required, **optional})

    require_rank(_SCAN, "u", u, 3, "(batch, D, L)")
    batch, dim, length = u.shape
    require_shape(_SCAN, "delta", delta, (batch, dim, length), "(batch, D, L)")
    require_rank(_SCAN, "A", A, 2, "(D, N)")
    if A.shape[0] != dim:
        _fail(_SCAN, f"A must have shape (D, N) with D={dim}; got {_shape(A)}")
    dstate = A.shape[1]
    _check_scan_input_projection("B", B, batch, dim, dstate, length)
    _check_scan_input_projection("C", C, batch, dim, dstate, length)
    if D is not None:
        require_shape(_SCAN, "D", D, (dim,), "(D,)")
    if z is not None:
        require_shape(_SCAN, "z", z, (batch, dim, length), "(batch, D, L)")
    if delta_bias is not None:
        require_shape(_SCAN, "delta_bias", delta_bias, (dim,), "(D,)")
    if gap is not None:
        require_shape(_SCAN, "gap", gap, (batch, length), "(batch, L)")


# ----------------------------------------------------------------------------- token ops


def check_positions(op: str, pos, batch, tokens) -> None:
    """pos: int64 (batch, K) map from kept slot to original position."""
    require_tensor(op, "pos", pos)
    require_int64(op, "pos", pos)
    require_shape(op, "pos", pos, (batch, tokens), "(batch, K)")


def check_depthwise_weight_and_bias(op: str, weight, bias, channels: int, kernel_rank: int) -> None:
    require_tensor(op, "weight", weight)
    require_floating(op, "weight", weight)
    kernel_axes = ", ".join(["W"] if kernel_rank == 1 else ["kh", "kw"])
    if weight.dim() != 2 + kernel_rank or weight.shape[0] != channels or weight.shape[1] != 1:
        _fail(
            op,
            f"weight must have shape (C, 1, {kernel_axes}) with C={channels} (depthwise); "
            f"got {_shape(weight)}",
        )
    if bias is not None:
        require_tensor(op, "bias", bias)
        require_floating(op, "bias", bias)
        require_shape(op, "bias", bias, (channels,), "(C,)")


def check_pos_conv1d_args(x, weight, bias, pos, left: int) -> None:
    op = "pos_conv1d"
    require_tensor(op, "x", x)
    require_floating(op, "x", x)
    require_rank(op, "x", x, 3, "(batch, C, K)")
    batch, channels, tokens = x.shape
    check_depthwise_weight_and_bias(op, weight, bias, channels, kernel_rank=1)
    check_positions(op, pos, batch, tokens)
    require_same_device(op, "x", x, {"weight": weight, "bias": bias, "pos": pos})
    width = weight.shape[-1]
    if not isinstance(left, int) or not 0 <= left < width:
        _fail(op, f"left must be an int in [0, W) = [0, {width}); got {left!r}")


def check_pos_conv2d_args(x, weight, bias, pos, height: int, width: int, padding: int) -> None:
    op = "pos_conv2d"
    require_tensor(op, "x", x)
    require_floating(op, "x", x)
    require_rank(op, "x", x, 3, "(batch, K, C)")
    batch, tokens, channels = x.shape
    check_depthwise_weight_and_bias(op, weight, bias, channels, kernel_rank=2)
    check_positions(op, pos, batch, tokens)
    require_same_device(op, "x", x, {"weight": weight, "bias": bias, "pos": pos})
    kh, kw = weight.shape[-2:]
    if height + 2 * padding - kh + 1 != height or width + 2 * padding - kw + 1 != width:
        _fail(
            op,
            f"padding={padding} with a ({kh}, {kw}) kernel must keep the ({height}, {width}) grid "
            f"size (stride 1, kernel size 2 * padding + 1)",
        )
    if tokens > height * width:
        _fail(op, f"x has K={tokens} tokens but the grid has only height * width = {height * width} cells")


def check_path_order_args(path, pos) -> None:
    op = "path_order"
    require_tensor(op, "path", path)
    require_int64(op, "path", path)
    require_rank(op, "path", path, 1, "(L,)")
    require_tensor(op, "pos", pos)
    require_int64(op, "pos", pos)
    require_rank(op, "pos", pos, 2, "(batch, K)")
    require_same_device(op, "path", path, {"pos": pos})
    if pos.shape[1] > path.shape[0]:
        _fail(op, f"pos must have shape (batch, K) with K <= L={path.shape[0]}; got {_shape(pos)}")


def check_token_index(op: str, x, index, dim: int) -> int:
    """Validate a per-sample slot index (batch, K) for an axis of x; return the axis, normalised."""
    require_tensor(op, "x", x)
    require_tensor(op, "index", index)
    require_int64(op, "index", index)
    if x.dim() < 2:
        _fail(op, f"x must have a batch axis and a token axis; got shape {_shape(x)}")
    axis = dim % x.dim() if -x.dim() <= dim < x.dim() else None
    if axis is None or axis == 0:
        _fail(op, f"dim must name a non-batch axis of x (rank {x.dim()}); got {dim}")
    require_rank(op, "index", index, 2, "(batch, K)")
    if index.shape[0] != x.shape[0]:
        _fail(op, f"index must have shape (batch, K) with batch={x.shape[0]}; got {_shape(index)}")
    require_same_device(op, "x", x, {"index": index})
    return axis


# ----------------------------------------------------------------------------- SSD (Mamba-2) scan

_SSD = "ssd_scan"


def check_ssd_scan_args(x, dt, A, B, C, D, z, dt_bias, gap) -> None:
    """Validate the arguments of ``ssd_scan`` (mamba_ssm's ``mamba_chunk_scan_combined`` layout)."""
    required = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    optional = {"D": D, "z": z, "dt_bias": dt_bias, "gap": gap}
    for name, value in required.items():
        require_tensor(_SSD, name, value)
    for name, value in optional.items():
        if value is not None:
            require_tensor(_SSD, name, value)
    for name, value in {**required, "D": D, "z": z, "dt_bias": dt_bias}.items():
        if value is not None:
            require_floating(_SSD, name, value)
    if gap is not None and (gap.dtype == torch.bool or gap.is_complex()):
        _fail(_SSD, f"gap must be a real integer or floating-point tensor; got dtype {gap.dtype}")
    require_same_device(_SSD, "x", x, {**required, **optional})

    require_rank(_SSD, "x", x, 4, "(batch, L, heads, headdim)")
    batch, length, heads, headdim = x.shape
    require_shape(_SSD, "dt", dt, (batch, length, heads), "(batch, L, heads)")
    require_shape(_SSD, "A", A, (heads,), "(heads,) (one scalar decay per head)")
    for name, t in (("B", B), ("C", C)):
        require_rank(_SSD, name, t, 4, "(batch, L, groups, N)")
        groups = t.shape[2]
        if tuple(t.shape[:2]) != (batch, length) or groups == 0 or heads % groups:
            _fail(_SSD, f"{name} must have shape (batch, L, groups, N) with batch={batch}, L={length} and "
                        f"groups dividing heads={heads}; got {_shape(t)}")
    if B.shape != C.shape:
        _fail(_SSD, f"B and C must have the same shape (batch, L, groups, N); got {_shape(B)} and {_shape(C)}")
    if D is not None and _shape(D) not in ((heads,), (heads, headdim)):
        _fail(_SSD, f"D must have shape (heads,) = {(heads,)} or (heads, headdim) = {(heads, headdim)}; "
                    f"got {_shape(D)}")
    if z is not None:
        require_shape(_SSD, "z", z, (batch, length, heads, headdim), "(batch, L, heads, headdim)")
    if dt_bias is not None:
        require_shape(_SSD, "dt_bias", dt_bias, (heads,), "(heads,)")
    if gap is not None:
        require_shape(_SSD, "gap", gap, (batch, length), "(batch, L)")
