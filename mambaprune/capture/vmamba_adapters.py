"""Adapters for VMamba's entry points (MzeroMiko/VMamba, classification/models/csms6s.py, csm_triton.py).

VMamba's code is not an installed package: its files are copied into projects and imported as
`models.csms6s`, `csms6s`, `classification.models.csm_triton` ... The entries are therefore found
by the last component of the module's name (scan_registry.BY_MODULE_TAIL), among modules already
imported when the model is captured.

- the scan: `csms6s.selective_scan_fn`, `selective_scan_torch` and the CUDA autograd Function
  `SelectiveScanCuda` (grouped B, C: (B, K, N, L)) become ONE `mambaprune::selective_scan`.
- the cross-scan: `csm_triton.cross_scan_fn` / `cross_merge_fn`, the autograd Functions
  `CrossScanF` / `CrossMergeF` and their Triton twins. Their torch path fills a `new_empty` tensor by
  slice assignment and runs under `torch.cuda.device(x.device)`, which raises for a CPU tensor; the
  adapters compute the same tensor with flatten / transpose / flip / stack (a constant token
  permutation per direction, which the analyser follows) and need no device.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..runtime import selective_scan


# -- csms6s -----------------------------------------------------------------------------------------
def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True, backend=None,
                      *args, **kwargs):
    """u, delta (B, K*C, L); A (K*C, N); B, C (B, K, N, L) or (B, N, L); D, delta_bias (K*C)."""
    if B.dim() not in (3, 4) or C.shape != B.shape:
        raise UnsupportedModelError(
            f"VMamba's selective_scan_fn with B of shape {tuple(B.shape)} and C of shape {tuple(C.shape)} is not "
            "understood: mambaprune reads B and C as (batch, groups, N, L) or (batch, N, L)")
    y = selective_scan(*(_fp32(t) for t in (u, delta, A, B, C)), D, None, delta_bias, delta_softplus)
    return y if oflex or y.dtype == u.dtype else y.to(u.dtype)


def _fp32(t):
    """The official fallback computes in fp32; a no-op cast would leave a metadata assert in the graph."""
    return t if t.dtype == torch.float32 else t.float()


def selective_scan_cuda_apply(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, oflex=True,
                              backend=None):
    return selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus, oflex, backend)


# -- csm_triton ---------------------------------------------------------------------------------------
def _rows(grid):
    return grid.flatten(-2)                            # (..., C, H, W) -> (..., C, H*W), row-major


def _cols(grid):
    return grid.transpose(-2, -1).flatten(-2)          # column-major


def cross_scan_fn(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    """x (B, C, H, W) | (B, H, W, C) | (B, 4, C, H, W) | (B, H, W, 4, C) -> (B, 4, C, L) | (B, L, 4, C)."""
    if not in_channel_first:
        x = x.permute(0, 3, 4, 1, 2) if one_by_one else x.permute(0, 3, 1, 2)
    parts = [x[:, k] for k in range(4)] if one_by_one else [x] * 4
    if scans == 0:
        seqs = [_rows(parts[0]), _cols(parts[1]), _rows(parts[2]).flip(-1), _cols(parts[3]).flip(-1)]
    elif scans == 1:
        seqs = [_rows(p) for p in parts]
    elif scans == 2:
        seqs = [_rows(parts[0]), _rows(parts[1]), _rows(parts[2]).flip(-1), _rows(parts[3]).flip(-1)]
    else:
        raise UnsupportedModelError(f"VMamba's cross_scan_fn(scans={scans}) is not a scan mode mambaprune knows "
                                    "(0: cross2d, 1: unidirectional, 2: bidirectional)")
    ys = torch.stack(seqs, dim=1)                      # (B, 4, C, L)
    return ys if out_channel_first else ys.permute(0, 3, 1, 2).contiguous()


def cross_merge_fn(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    """y (B, 4, C, H, W) | (B, H, W, 4, C) -> (B, C, L) | (B, L, C); one_by_one: (B, 4, C, L) | (B, L, 4, C)."""
    if out_channel_first:
        height, width = y.shape[-2:]
        seq = y.flatten(3)                             # (B, 4, C, L)
    else:
        height, width = y.shape[1:3]
        seq = y.flatten(1, 2).permute(0, 2, 3, 1)      # (B, 4, C, L)
    parts = [seq[:, k] for k in range(4)]

    def from_cols(t):                                  # a column-major sequence back to row-major
        return t.unflatten(-1, (width, height)).transpose(-2, -1).flatten(-2)

    if scans == 0:
        back = [parts[0], from_cols(parts[1]), parts[2].flip(-1), from_cols(parts[3].flip(-1))]
    elif scans == 1:
        back = parts
    elif scans == 2:
        back = [parts[0], parts[1], parts[2].flip(-1), parts[3].flip(-1)]
    else:
        raise UnsupportedModelError(f"VMamba's cross_merge_fn(scans={scans}) is not a scan mode mambaprune knows "
                                    "(0: cross2d, 1: unidirectional, 2: bidirectional)")
    if one_by_one:
        out = torch.stack(back, dim=1)                 # (B, 4, C, L)
        return out if in_channel_first else out.permute(0, 3, 1, 2).contiguous()
    out = back[0] + back[1] + back[2] + back[3]        # (B, C, L)
    return out if in_channel_first else out.transpose(1, 2).contiguous()


def cross_scan_apply(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
    return cross_scan_fn(x, in_channel_first, out_channel_first, one_by_one, scans)


def cross_merge_apply(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
    return cross_merge_fn(y, in_channel_first, out_channel_first, one_by_one, scans)


# (module name's last component, attribute, adapter, is an autograd Function)
BY_MODULE_TAIL = [
    ("csms6s", "selective_scan_fn", selective_scan_fn, False),
    ("csms6s", "selective_scan_torch", selective_scan_fn, False),
    ("csms6s", "SelectiveScanCuda", selective_scan_cuda_apply, True),
    ("csms6s", "SelectiveScanOflex", selective_scan_cuda_apply, True),
    ("csms6s", "SelectiveScanCore", selective_scan_cuda_apply, True),
    ("csms6s", "SelectiveScanMamba", selective_scan_cuda_apply, True),
    ("csm_triton", "cross_scan_fn", cross_scan_fn, False),
    ("csm_triton", "cross_merge_fn", cross_merge_fn, False),
    ("csm_triton", "CrossScanF", cross_scan_apply, True),
    ("csm_triton", "CrossMergeF", cross_merge_apply, True),
    ("csm_triton", "CrossScanTritonF", cross_scan_apply, True),
    ("csm_triton", "CrossMergeTritonF", cross_merge_apply, True),
]
