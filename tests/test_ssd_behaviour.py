"""Mamba-2 (SSD) scans found by behaviour: a vendored copy of the chunked SSD under a module name
mambaprune never heard of is routed to `mambaprune::ssd_scan` (capture/ssd_probe.py), whether it is
called through its module, bound into a `functools.partial` in __init__, or written in the minimal
SSD's discretised form; a copy with other math and SSD shapes is left alone and named in the
refusal. The kernels are our own reproductions (tests/vendored_ssd.py, chunked, independent of the
op's token loop), the mixer the split path of mamba_ssm's Mamba2 as vision code writes it.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vendored_ssd
from mambaprune import UnsupportedModelError
from mambaprune.api.compile import prepare
from mambaprune.capture.scan_probe import Slot
from mambaprune.capture.ssd_probe import ssd_probe, ssd_readings
from tests.official_zoo import checks
from tests.test_mamba2_routing import Mamba2

SSD = torch.ops.mambaprune.ssd_scan.default


class Mamba2Mixer(Mamba2):
    """mamba_ssm's Mamba2 parameters (tests/test_mamba2_routing.py): in_proj to z, x, B, C, dt; causal
    depthwise conv1d + SiLU over x, B, C; the SSD through a vendored kernel (`form`); D skip; gate by
    silu(z) (in the kernel where it takes z); out_proj."""

    def __init__(self, d_model, form, d_state=4, headdim=4, chunk_size=8):
        super().__init__(d_model, d_state=d_state, headdim=headdim, use_mem_eff_path=False, chunk_size=chunk_size)
        self.form = form
        if form == "partial":
            self.ssd = partial(vendored_ssd.chunk_scan, chunk_size=chunk_size, dt_softplus=True)

    def forward(self, u):
        batch, length, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                   self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(batch, length, self.nheads, self.headdim)
        B, C = (t.reshape(batch, length, self.ngroups, self.d_state) for t in (B, C))
        A = -torch.exp(self.A_log.float())
        y = getattr(self, self.form)(x, dt, A, B, C, z.reshape(batch, length, self.nheads, self.headdim))
        return self.out_proj(y.reshape(batch, length, -1))

    def module_global(self, x, dt, A, B, C, z):
        return vendored_ssd.chunk_scan(x, dt, A, B, C, self.chunk_size, D=self.D, z=z, dt_bias=self.dt_bias,
                                       dt_softplus=True)

    def partial(self, x, dt, A, B, C, z):
        return self.ssd(x, dt, A, B, C, D=self.D, dt_bias=self.dt_bias) * F.silu(z)

    def discrete(self, x, dt, A, B, C, z):
        dt = F.softplus(dt + self.dt_bias)
        B, C = (t.repeat_interleave(self.nheads // self.ngroups, dim=2) for t in (B, C))
        y, _ = vendored_ssd.ssd_discrete(x * dt[..., None], A * dt, B, C, self.chunk_size)
        return (y + self.D[:, None] * x) * F.silu(z)

    def other_math(self, x, dt, A, B, C, z):
        return vendored_ssd.chunk_scan_sigmoid_decay(x, dt, A, B, C, self.chunk_size, D=self.D,
                                                     dt_bias=self.dt_bias, dt_softplus=True) * F.silu(z)


class Block(nn.Module):
    def __init__(self, dim, form):
        super().__init__()
        self.norm, self.mixer = nn.LayerNorm(dim), Mamba2Mixer(dim, form)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyMamba2(nn.Module):
    """Patch embedding, position embedding, Mamba-2 blocks, norm, mean pool, linear head."""

    def __init__(self, form, dim=16, depth=4, img_size=32, patch=4):
        super().__init__()
        self.img_size = img_size
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, form) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


NAMES = {"module_global": "vendored_ssd.chunk_scan", "partial": "vendored_ssd.chunk_scan",
         "discrete": "vendored_ssd.ssd_discrete"}


@pytest.mark.parametrize("form", list(NAMES))
def test_a_vendored_ssd_is_recognised_routed_and_pruned_with_the_standard_checks(form):
    torch.manual_seed(0)
    model = TinyMamba2(form).eval()
    gm = prepare(model).captured.gm
    assert sum(node.target is SSD for node in gm.graph.nodes) == 4
    out = checks.run(f"vendored SSD ({form})", model, model.img_size)
    assert checks.green(out), out
    lines = [line for line in str(out.report).splitlines() if line.startswith("recognised by behaviour: ")]
    assert any(NAMES[form] in line and "is a Mamba-2 (SSD) scan: it agrees with mambaprune.ssd_scan" in line
               for line in lines), lines
    if form == "discrete":
        assert any("A * dt=argument 1" in line and "discretised" in line for line in lines), lines


def test_an_ssd_shaped_kernel_with_other_math_is_left_alone_and_named_in_the_refusal():
    torch.manual_seed(0)
    model = TinyMamba2("other_math").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError) as err:
        prepare(model)
    message = str(err.value)
    assert "no selective scan was found" in message
    assert "vendored_ssd.chunk_scan_sigmoid_decay has the arguments of a Mamba-2 (SSD) scan" in message
    assert "differs from mambaprune.ssd_scan under every reading" in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_readings_of_the_chunk_scan_signature():
    """mamba_chunk_scan_combined's arguments: x and z, dt, A, D and dt_bias (all (heads,)), B and C of
    one shape: the agreeing reading is found among those the shapes allow, and only that one agrees."""
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 10, 4, 3, 2, 5
    x, z = torch.randn(b, l, h, p), torch.randn(b, l, h, p)
    args = (x, torch.randn(b, l, h), -torch.rand(h) - 0.5, torch.randn(b, l, g, n), torch.randn(b, l, g, n), 4)
    kwargs = {"D": torch.rand(h), "z": z, "dt_bias": torch.rand(h) - 0.5, "dt_softplus": True}
    candidates = ssd_readings(args, kwargs)
    assert len(candidates) > 1
    verdict = ssd_probe(vendored_ssd.chunk_scan, args, kwargs, vendored_ssd.chunk_scan(*args, **kwargs), candidates)
    assert verdict.agrees
    r = verdict.reading
    assert (r.x, r.dt, r.A, r.B, r.C) == (Slot(0), Slot(1), Slot(2), Slot(3), Slot(4))
    assert (r.D, r.z, r.dt_bias, r.softplus) == (Slot(name="D"), Slot(name="z"), Slot(name="dt_bias"), True)
    torch.testing.assert_close(verdict.result(args, kwargs), vendored_ssd.chunk_scan(*args, **kwargs),
                               rtol=1e-5, atol=1e-5)
