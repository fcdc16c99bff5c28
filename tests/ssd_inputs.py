"""Inputs of the SSD (Mamba-2) scan in mamba_ssm's layout, for the SSD tests (CPU; Triton's interpreter)."""

import torch

SSD_ORDER = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "gap"]
SSD_GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]


def ssd_inputs(dtype=torch.float32, batch=2, length=11, heads=6, headdim=5, groups=3, dstate=4, D=None, z=False,
               dt_bias=False, dt_softplus=False, gap=False, views=False, seed=0):
    """D: None, "head" (heads,) or "channel" (heads, headdim). dt stays positive without softplus so that
    the states decay; gap: int64 steps in [1, 3]. views: x, z, B, C as slices of one in_proj-like output
    and dt as a strided slice, the way mamba_ssm's Mamba2 layer hands them over."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    channels = heads * headdim
    if views:
        projected = r(batch, length, 2 * channels + 2 * groups * dstate + heads).to(dtype)  # cast before slicing
        z_v, x_v, B_v, C_v, dt_v = projected.split([channels, channels, groups * dstate, groups * dstate, heads], -1)
        x_t, z_t = x_v.unflatten(-1, (heads, headdim)), z_v.unflatten(-1, (heads, headdim))
        B_t, C_t = B_v.unflatten(-1, (groups, dstate)), C_v.unflatten(-1, (groups, dstate))
        dt_t = dt_v.abs() * 0.5
    else:
        x_t, z_t = r(batch, length, heads, headdim), r(batch, length, heads, headdim)
        B_t, C_t = r(batch, length, groups, dstate), r(batch, length, groups, dstate)
        dt_t = torch.rand(batch, length, heads, generator=g, dtype=torch.float64) * 0.5
    args = dict(x=x_t, dt=dt_t, A=-(torch.rand(heads, generator=g, dtype=torch.float64) * 2 + 0.1), B=B_t, C=C_t)
    if D == "head":
        args["D"] = r(heads)
    elif D == "channel":
        args["D"] = r(heads, headdim)
    if z:
        args["z"] = z_t
    if dt_bias:
        bias = r(heads) * 0.5
        args["dt_bias"] = bias if dt_softplus else bias.abs()  # keep dt > 0: decaying states
    args["dt_softplus"] = bool(dt_softplus)
    if gap:
        args["gap"] = torch.randint(1, 4, (batch, length), generator=g)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


def ssd_positional(args):
    return [args.get(k, False if k == "dt_softplus" else None) for k in SSD_ORDER]
