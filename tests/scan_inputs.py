"""Selective-scan inputs shared by tests/test_scan_triton.py and the interpreter subprocesses it runs."""

import torch

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
