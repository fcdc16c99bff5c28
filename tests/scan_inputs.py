"""Selective-scan inputs and the scan's float64 definition, shared by the scan tests
(test_selective_scan.py, test_scan_cpp.py, test_scan_triton.py and the subprocesses it runs)."""

import torch
import torch.nn.functional as F

OP_ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "gap"]


def inputs(dtype=torch.float32, groups=None, extras=False, channels_last=False, batch=2, dim=12, dstate=5,
           length=9, seed=0, device="cpu", **only):
    """Keyword arguments of selective_scan. extras=True adds every optional argument (D, z,
    delta_bias with softplus, an integer gap); D=True, gap=True, ... add single ones."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    u = r(batch, length, dim).transpose(1, 2) if channels_last else r(batch, dim, length)
    bc = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    args = dict(u=u, delta=torch.rand(batch, dim, length, generator=g) * 0.5,
                A=-(torch.rand(dim, dstate, generator=g) + 0.1), B=r(*bc), C=r(*bc))
    optional = dict(D=r(dim), z=r(batch, dim, length), delta_bias=r(dim) * 0.3, delta_softplus=True,
                    gap=torch.randint(1, 5, (batch, length), generator=g))
    args.update({k: v for k, v in optional.items() if extras or only.get(k)})

    def place(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    return {k: place(v) for k, v in args.items()}


def positional(args):
    """The op's positional arguments (torch.ops.mambaprune.selective_scan[_triton])."""
    return [args.get(k, False if k == "delta_softplus" else None) for k in OP_ORDER]


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    """The definition, one token at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = dim // B.shape[1]
    B_ch = B.repeat_interleave(per_group, dim=1)  # (batch, D, N, L)
    C_ch = C.repeat_interleave(per_group, dim=1)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    gap = torch.ones(batch, length, dtype=torch.float64) if gap is None else gap.double()
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(gap[:, t, None, None] * dt * A) * h + dt * B_ch[..., t] * u[:, :, t, None]
        ys.append((h * C_ch[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y
