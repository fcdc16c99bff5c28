"""CPU stand-ins for the compiled CUDA extensions some families call straight through: mamba_ssm's
`selective_scan_cuda`, VMamba's `selective_scan_cuda_oflex` / `selective_scan_cuda_core` and Dao's `causal_conv1d_cuda`.

Each `fwd` returns what the extension returns (the output first, then the saved chunk states the
backward needs), computed with the token-loop reference of mamba_ssm_stub. Installed in sys.modules by
`installed()` for as long as a family is imported and run; nothing in mambaprune knows these names.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch.nn.functional as F
from mamba_ssm_stub import ref_selective_scan_fn


def _selective_scan_cuda_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """selective_scan_cuda.fwd: (out, x) or (out, x, out_z) when z is given (out_z gated)."""
    out = ref_selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    last = ref_selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state=True)[1]
    if z is None:
        return out, last
    return out, last, out * F.silu(z)


def _selective_scan_cuda_oflex_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows, oflex):
    out, last = _selective_scan_cuda_fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return out, last


def _selective_scan_cuda_core_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows):
    return _selective_scan_cuda_oflex_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows, True)


def _causal_conv1d_fwd(x, weight, bias, seq_idx, silu_activation):
    """causal_conv1d_cuda.causal_conv1d_fwd: depthwise conv over the last axis, left padding only."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if silu_activation else out


def _modules() -> dict:
    scan, oflex, core, conv = (types.ModuleType(n) for n in ("selective_scan_cuda", "selective_scan_cuda_oflex",
                                                             "selective_scan_cuda_core", "causal_conv1d_cuda"))
    scan.fwd, oflex.fwd, core.fwd = _selective_scan_cuda_fwd, _selective_scan_cuda_oflex_fwd, _selective_scan_cuda_core_fwd
    conv.causal_conv1d_fwd = _causal_conv1d_fwd
    return {m.__name__: m for m in (scan, oflex, core, conv)}


@contextlib.contextmanager
def installed():
    saved = {name: sys.modules.get(name) for name in _modules()}
    sys.modules.update(_modules())
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
