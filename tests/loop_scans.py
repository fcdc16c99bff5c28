"""A selective scan written as a Python loop, like hand-written research code, and its adapter
for `mambaprune.register_scan` (shared by the tests that declare hand-written scans)."""
import torch

import mambaprune


def loop_scan(u, delta, A, B, C, D):
    """(batch, L, D) layout, one token at a time."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t, :, None]
        h = torch.exp(dt * A) * h + dt * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + D * u


def loop_scan_adapter(u, delta, A, B, C, D):
    y = mambaprune.selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                  C.transpose(1, 2), D)
    return y.transpose(1, 2)
