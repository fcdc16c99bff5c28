"""csms6s: VMamba's selective scan entry point (see the package docstring).

`selective_scan_fn` takes u, delta (B, K*C, L), A (K*C, N), grouped B, C (B, K, N, L), D (K*C),
delta_bias (K*C); it runs `SelectiveScanCuda` when one of the CUDA extensions imports, else the
token loop `selective_scan_torch`.
"""
import torch
import torch.nn.functional as F

try:
    import selective_scan_cuda_oflex  # noqa: F401
    WITH_SELECTIVESCAN_OFLEX = True
except ImportError:
    WITH_SELECTIVESCAN_OFLEX = False
try:
    import selective_scan_cuda_core  # noqa: F401
    WITH_SELECTIVESCAN_CORE = True
except ImportError:
    WITH_SELECTIVESCAN_CORE = False
try:
    import selective_scan_cuda  # noqa: F401
    WITH_SELECTIVESCAN_MAMBA = True
except ImportError:
    WITH_SELECTIVESCAN_MAMBA = False


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True,
                         *args, **kwargs):
    """The pure-torch fallback: one state update per token."""
    dtype_in = u.dtype
    batch, groups, n, length = B.shape
    channels = u.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    u, delta, A = u.float(), delta.float(), A.float()
    per_channel = channels // groups
    Bc = B.float().repeat_interleave(per_channel, dim=1)          # (batch, channels, n, length)
    Cc = C.float().repeat_interleave(per_channel, dim=1)
    decay = torch.exp(delta[..., None] * A[:, None, :])           # (batch, channels, length, n)
    drive = (delta * u)[..., None] * Bc.transpose(2, 3)           # (batch, channels, length, n)
    state = A.new_zeros(batch, channels, n)
    ys = []
    for t in range(length):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append((state * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    return out if oflex else out.to(dtype_in)


_EXTENSIONS = (("oflex", WITH_SELECTIVESCAN_OFLEX), ("core", WITH_SELECTIVESCAN_CORE),
               ("mamba", WITH_SELECTIVESCAN_MAMBA))


def _cuda_forward(backend, u, delta, A, B, C, D, delta_bias, delta_softplus, oflex):
    """Each extension's fwd, with its own argument list; returns (out, last states)."""
    if backend == "oflex":
        out, state, *_ = selective_scan_cuda_oflex.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, 1, oflex)
    elif backend == "core":
        out, state, *_ = selective_scan_cuda_core.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, 1)
    elif backend == "mamba":
        out, state, *_ = selective_scan_cuda.fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    else:
        raise RuntimeError("SelectiveScanCuda needs one of VMamba's CUDA extensions")
    return out, state


class SelectiveScanCuda(torch.autograd.Function):
    """The CUDA kernels (oflex, core or mamba's); only usable where one of them imports."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, oflex=True, backend=None):
        backend = backend or next((name for name, present in _EXTENSIONS if present), None)
        out, state = _cuda_forward(backend, u, delta, A, B, C, D, delta_bias, delta_softplus, oflex)
        ctx.backend, ctx.delta_softplus = backend, delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, state)
        return out

    @staticmethod
    def backward(ctx, dout, *args):
        raise NotImplementedError("the CUDA backward is not reproduced here")


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True, backend=None):
    """u, delta (B, K*C, L); A (K*C, N); B, C (B, K, N, L); D, delta_bias (K*C)."""
    on_cuda = backend != "torch" and any(present for _, present in _EXTENSIONS)
    scan = SelectiveScanCuda.apply if on_cuda else selective_scan_torch
    return scan(u, delta, A, B, C, D, delta_bias, delta_softplus, oflex, backend)
