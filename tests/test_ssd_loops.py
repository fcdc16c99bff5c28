"""Mamba-2 (SSD) token loops lifted into one `mambaprune::ssd_scan` (capture/token_loops.py, loop_roles.py).

The Mamba-2 recurrence has one scalar decay per head: for a state h (batch, heads, headdim, N),
h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T, y_t = h_t C_t + D * x_t. Written as a Python loop over
the tokens, these forms are lifted: by hand (the decay per head broadcast over the state, a product
summed over N), the same over the tokens last to first, mamba_ssm's reference step
(`selective_state_update_ref`: A, dt and D repeated over the head dim and the state, an einsum readout,
the skip added after it), one group per head with the states stacked and read out after the loop by
one einsum, and groups repeated to one per head before the loop (lifted with a group per head). Each
becomes exactly one ssd_scan whose graph computes the module at another batch size. Loops that are not this scan are left alone:
a decay that differs within a head (a Mamba-1 scan over heads x headdim channels, not lifted), B and
C grouped differently, a loop that returns its final state. A small bidirectional vision model
written with the hand form is pruned with the standard checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune.capture.token_loops import lift_token_loops
from tests.official_zoo import checks
from tests.test_token_loops import count, exported

SSD = torch.ops.mambaprune.ssd_scan.default
SCAN = torch.ops.mambaprune.selective_scan.default


class Mixer2(nn.Module):
    """x (batch, L, d_model) -> y (batch, L, heads, headdim): projections as Mamba2's in_proj, the scan
    a Python loop over the tokens in one of several forms."""

    def __init__(self, form: str, d_model: int = 16, heads: int = 4, headdim: int = 4, d_state: int = 4):
        super().__init__()
        self.form, self.nheads, self.headdim, self.d_state = form, heads, headdim, d_state
        self.in_proj = nn.Linear(d_model, heads * headdim + 2 * heads * d_state + heads)
        self.A_log = nn.Parameter(torch.rand(heads) * 2 - 1)
        self.dt_bias = nn.Parameter(torch.rand(heads) - 0.5)
        self.D = nn.Parameter(torch.randn(heads))

    def parts(self, u, groups: int = 1):
        batch, seqlen, _ = u.shape
        H, P, N = self.nheads, self.headdim, self.d_state
        x, B, C, dt = torch.split(self.in_proj(u), [H * P, H * N, H * N, H], dim=-1)
        B, C = B[..., :groups * N], C[..., :groups * N]
        x = x.view(batch, seqlen, H, P)
        if groups > 1:
            B, C = B.view(batch, seqlen, groups, N), C.view(batch, seqlen, groups, N)
        return x, F.softplus(dt + self.dt_bias), B, C, -torch.exp(self.A_log)

    def forward(self, u):
        return getattr(self, self.form)(u)

    def by_hand(self, u, final_state=False):
        x, dt, B, C, A = self.parts(u)
        h = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state)
        ys = []
        for t in range(u.shape[1]):
            dA = torch.exp(dt[:, t] * A)
            h = dA[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
            ys.append((h * C[:, t, None, None, :]).sum(-1) + self.D[:, None] * x[:, t])
        y = torch.stack(ys, dim=1)
        return (y, h) if final_state else y

    def backwards(self, u):
        """The hand form over the tokens last to first, the outputs put back in token order."""
        x, dt, B, C, A = self.parts(u)
        h, ys = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state), []
        for t in reversed(range(u.shape[1])):
            h = torch.exp(dt[:, t] * A)[:, :, None, None] * h \
                + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
            ys.append((h * C[:, t, None, None, :]).sum(-1) + self.D[:, None] * x[:, t])
        return torch.stack(ys[::-1], dim=1)

    def step_reference(self, u):
        """mamba_ssm's selective_state_update_ref per token: A (h, p, n), dt (b, h, p), D (h, p)."""
        x, dt, B, C, A = self.parts(u)
        H, P, N = self.nheads, self.headdim, self.d_state
        A = A[:, None, None].expand(H, P, N)
        dt = dt[..., None].expand(*dt.shape, P)
        D = self.D[:, None].expand(H, P)
        state = x.new_zeros(x.shape[0], H, P, N)
        outs = []
        for t in range(u.shape[1]):
            dA = torch.exp(dt[:, t, :, :, None] * A)
            dB = dt[:, t, :, :, None] * B[:, t, None, None, :]
            state = state * dA + dB * x[:, t, :, :, None]
            out = torch.einsum("bhdn,bn->bhd", state, C[:, t])
            outs.append(out + x[:, t] * D)
        return torch.stack(outs, dim=1)

    def per_head_stacked(self, u):
        """One group per head (B, C (b, L, heads, N)); the states stacked, read out after the loop."""
        x, dt, B, C, A = self.parts(u, groups=self.nheads)
        dA = torch.exp(dt * A)
        dBx = torch.einsum("blh,blhn,blhp->blhpn", dt, B, x)
        h, hs = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state), []
        for t in range(u.shape[1]):
            h = dA[:, t, :, None, None] * h + dBx[:, t]
            hs.append(h)
        return torch.einsum("blhpn,blhn->blhp", torch.stack(hs, dim=1), C) + self.D[:, None] * x

    def groups_repeated(self, u):
        """Two groups of B and C, each read by two heads: repeated to one per head before the loop."""
        x, dt, B, C, A = self.parts(u, groups=2)
        B, C = (v.repeat_interleave(self.nheads // 2, dim=2) for v in (B, C))
        h, ys = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state), []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t] * A)[:, :, None, None] * h \
                + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((h * C[:, t, :, None, :]).sum(-1) + self.D[:, None] * x[:, t])
        return torch.stack(ys, dim=1)

    # loops that are not lifted
    def decay_per_channel(self, u):
        x, dt, B, C, _ = self.parts(u)
        A = -torch.exp(self.A_log)[:, None] * torch.arange(1.0, self.headdim + 1)   # (heads, headdim)
        h, ys = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state), []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t, :, None, None] * A[..., None]) * h \
                + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
            ys.append((h * C[:, t, None, None, :]).sum(-1))
        return torch.stack(ys, dim=1)

    def groups_differ(self, u):
        x, dt, B, C, A = self.parts(u, groups=self.nheads)
        C = C[:, :, 0]                          # C shared by the heads, B one group per head
        h, ys = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state), []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t] * A)[:, :, None, None] * h \
                + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((h * C[:, t, None, None, :]).sum(-1))
        return torch.stack(ys, dim=1)

    def final_state(self, u):
        return self.by_hand(u, final_state=True)


@pytest.mark.parametrize("form", ["by_hand", "backwards", "step_reference", "per_head_stacked", "groups_repeated"])
def test_each_written_form_of_a_mamba2_loop_is_lifted_into_one_ssd_scan(form):
    torch.manual_seed(0)
    module = Mixer2(form).eval()
    gm = exported(module)
    lifted_gm, lifted = lift_token_loops(gm, (torch.randn(2, 6, 16),))
    assert [(loop.steps, loop.backward) for loop in lifted] == [(6, form == "backwards")]
    assert count(lifted_gm, SSD) == 1 and count(lifted_gm, SCAN) == 0
    assert count(lifted_gm, torch.ops.aten.stack.default) == 0
    assert count(gm, SSD) == 0, "the input graph module is not changed"
    ssd = next(node for node in lifted_gm.graph.nodes if node.target is SSD)
    groups = ssd.args[3].meta["val"].shape[2]
    assert groups == (4 if form in ("per_head_stacked", "groups_repeated") else 1)
    assert (ssd.args[5] is not None) == (form != "per_head_stacked"), "D only from a skip inside the loop"
    x = torch.randn(5, 6, 16)
    torch.testing.assert_close(lifted_gm(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["decay_per_channel", "groups_differ", "final_state"])
def test_mamba2_like_loops_that_are_not_the_ssd_scan_are_left_alone(form):
    torch.manual_seed(0)
    gm = exported(Mixer2(form).eval())
    same, lifted = lift_token_loops(gm)
    assert lifted == [] and same is gm


class HandWrittenVim2(nn.Module):
    """Patches -> blocks of (norm, the hand-written Mamba-2 loop forwards and over the flipped tokens,
    summed, gated by silu(z), out_proj) -> mean -> head."""

    def __init__(self, dim=16, depth=3, img_size=16, patch=4):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.gates = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.fwd = nn.ModuleList(Mixer2("by_hand", d_model=dim) for _ in range(depth))
        self.bwd = nn.ModuleList(Mixer2("by_hand", d_model=dim) for _ in range(depth))
        self.out_projs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        for norm, gate, fwd, bwd, out_proj in zip(self.norms, self.gates, self.fwd, self.bwd, self.out_projs):
            u = norm(x)
            y = (fwd(u) + bwd(u.flip(1)).flip(1)).flatten(2)
            x = x + out_proj(y * F.silu(gate(u)))
        return self.head(x.mean(1))


def test_a_model_with_hand_written_mamba2_loops_is_pruned_with_the_standard_checks():
    torch.manual_seed(0)
    model = HandWrittenVim2().eval()
    out = checks.run("hand-written Mamba-2 loops", model, model.img_size)
    assert checks.green(out), out
    assert "Python token loop, lifted into one scan x6" in str(out.report)
