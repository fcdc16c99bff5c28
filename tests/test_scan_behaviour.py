"""Scans found by behaviour: a selective scan mambaprune was never told about is routed wherever its
code lives (a partial bound in __init__, a closure, a vendored copy under another module name, an
autograd Function calling an extension's fwd), and a near miss with scan shapes is refused.

The mixers reproduce how published vision Mamba code (LocalMamba, EfficientVMamba, VMamba's copies)
calls its scans; the kernels are our own reproductions in tests/vendored_kernels.py.
"""
import functools
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mambaprune
import vendored_kernels
from mambaprune import UnsupportedModelError
from mambaprune.capture import capture
from mambaprune.capture.conv_probe import conv_probe, conv_readings
from mambaprune.capture.scan_probe import probe, readings
from vendored_kernels import SelectiveScan, selective_scan_easy

THIS = sys.modules[__name__]
IMG = 32
TOL = 1e-5
ORIGINALS = {"selective_scan_easy": selective_scan_easy, "selective_scan_ref": vendored_kernels.selective_scan_ref,
             "selective_scan_no_skip": vendored_kernels.selective_scan_no_skip,
             "selective_scan_with_state": vendored_kernels.selective_scan_with_state}


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


class MixerBase(nn.Module):
    """A Mamba-1 mixer (names as in mamba_ssm's Mamba); subclasses differ in how they call the scan."""

    def __init__(self, dim, d_state=4, expand=2, d_conv=3):
        super().__init__()
        inner = expand * dim
        self.d_state, self.dt_rank = d_state, max(1, dim // 8)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        nn.init.uniform_(self.dt_proj.bias, -3.0, -1.0)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)))
        self.D = nn.Parameter(torch.rand(inner) + 0.5)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, hidden):
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        x = self.causal_conv(x)
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        y = self.scan(x, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), z)
        return self.out_proj(y.transpose(1, 2))

    def causal_conv(self, x):
        return F.silu(self.conv1d(x)[..., :x.shape[-1]])


class PartialMixer(MixerBase):
    """(a) the kernel bound with functools.partial at construction (VMamba / EfficientVMamba style)."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, **kwargs)
        self.selective_scan = partial(vendored_kernels.selective_scan_ref, delta_softplus=True)

    def scan(self, x, delta, A, B, C, z):
        return self.selective_scan(x, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float())


def make_kernel(softplus):
    """(b) a closure: the scan is a nested function holding its flag in a cell."""
    def kernel(u, delta, A, B, C, D, z, bias):
        return vendored_kernels.selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus)
    return kernel


def closure_mixer(kernel):
    class ClosureMixer(MixerBase):
        def scan(self, x, delta, A, B, C, z):
            return kernel(x, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float())
    return ClosureMixer


class VendoredMixer(MixerBase):
    """(c) a vendored copy in VMamba's argument order (grouped B, C; no gate), imported by name."""

    def scan(self, x, delta, A, B, C, z):
        y = selective_scan_easy(x, delta, A, B[:, None], C[:, None], self.D.float(),
                                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return y * F.silu(z)


class VendoredModuleMixer(MixerBase):
    """(c) a vendored copy of mamba_ssm's reference, called through its module (another name)."""

    def scan(self, x, delta, A, B, C, z):
        return vendored_kernels.selective_scan_ref(x, delta, A, B, C, self.D.float(), z,
                                                   self.dt_proj.bias.float(), True)


class FunctionMixer(MixerBase):
    """(d) an autograd Function whose forward calls the extension's fwd (LocalMamba style)."""

    def scan(self, x, delta, A, B, C, z):
        y = SelectiveScan.apply(x, delta, A, B, C, self.D.float(), self.dt_proj.bias.float(), True, 1)
        return y * F.silu(z)


class PartialFunctionMixer(MixerBase):
    """(a)+(d) VMamba v2 style: the Function class bound into a partial of a method in __init__."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, **kwargs)
        self.forward_core = partial(self.core, SelectiveScan=vendored_kernels.SelectiveScanCore, nrows=1)

    def core(self, x, delta, A, B, C, z, SelectiveScan=None, nrows=-1):
        y = SelectiveScan.apply(x, delta, A, B[:, None], C[:, None], self.D.float(), self.dt_proj.bias.float(),
                                True, nrows)
        return y * F.silu(z)

    def scan(self, x, delta, A, B, C, z):
        return self.forward_core(x, delta, A, B, C, z)


class NearMissMixer(MixerBase):
    """(e) scan shapes, different math (the D skip is missing)."""

    def scan(self, x, delta, A, B, C, z):
        return vendored_kernels.selective_scan_no_skip(x, delta, A, B, C, self.D.float(), z,
                                                       self.dt_proj.bias.float(), True)


class LastStateMixer(MixerBase):
    """A scan that also returns its last state, which the model does not read."""

    def scan(self, x, delta, A, B, C, z):
        y, _ = vendored_kernels.selective_scan_with_state(x, delta, A, B, C, self.D.float(), z,
                                                          self.dt_proj.bias.float(), True)
        return y


class StateReadingMixer(MixerBase):
    """A scan that also returns its last state, and the model reads it."""

    def scan(self, x, delta, A, B, C, z):
        y, last = vendored_kernels.selective_scan_with_state(x, delta, A, B, C, self.D.float(), z,
                                                             self.dt_proj.bias.float(), True)
        return y + last.mean(-1, keepdim=True)


def _extension_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """What mamba_ssm's compiled selective_scan_cuda.fwd returns: out, the states its backward saves,
    and out * silu(z) when a gate is given."""
    out, last = vendored_kernels.selective_scan_with_state(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return (out, last) if z is None else (out, last, out * F.silu(z))


def _extension_conv(x, weight, bias, seq_idx, silu_activation):
    """What causal_conv1d's compiled causal_conv1d_fwd computes: a depthwise conv over the last axis, padded
    on the left only (written here with F.pad, as no ViM-style conv: the analysis does not follow it)."""
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if silu_activation else out


def _centred_conv(x, weight, bias, seq_idx, silu_activation):
    """A near miss: the same arguments, but the conv is centred, not causal."""
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] // 2, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if silu_activation else out


selective_scan_cuda = types.ModuleType("selective_scan_cuda")
selective_scan_cuda.fwd = _extension_fwd
causal_conv1d_cuda = types.ModuleType("causal_conv1d_cuda")
causal_conv1d_cuda.causal_conv1d_fwd = _extension_conv


class ExtensionMixer(MixerBase):
    """(f) the compiled extension's fwd called straight through its module, its tuple unpacked (Mamba-R's
    vendored MambaInnerFnCustom)."""

    def scan(self, x, delta, A, B, C, z):
        out, scan_intermediates, out_z = selective_scan_cuda.fwd(x, delta, A, B, C, self.D.float(), z,
                                                                 self.dt_proj.bias.float(), True)
        return out_z


class ExtensionConvMixer(ExtensionMixer):
    """(f) and the causal conv1d through its compiled extension too (Mamba-R)."""

    def causal_conv(self, x):
        return causal_conv1d_cuda.causal_conv1d_fwd(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, None, True)


class Block(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.norm = nn.LayerNorm(mixer.in_proj.in_features)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyViM(nn.Module):
    def __init__(self, make_mixer, dim=16, depth=4, patch=8, num_classes=5):
        super().__init__()
        self.img_size = IMG
        self.patch = nn.Conv2d(3, dim, patch, patch)
        num_tokens = (IMG // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(Block(make_mixer(dim)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


KINDS = {
    "partial": (PartialMixer, "vendored_kernels.selective_scan_ref"),
    "closure": (closure_mixer(make_kernel(True)), "test_scan_behaviour.make_kernel.<locals>.kernel"),
    "vendored": (VendoredMixer, "vendored_kernels.selective_scan_easy"),
    "vendored_module": (VendoredModuleMixer, "vendored_kernels.selective_scan_ref"),
    "autograd_function": (FunctionMixer, "vendored_kernels.SelectiveScan.apply"),
    "function_in_partial": (PartialFunctionMixer, "vendored_kernels.SelectiveScanCore.apply"),
    "extension_tuple": (ExtensionMixer, "test_scan_behaviour._extension_fwd"),
    "extension_conv": (ExtensionConvMixer, "test_scan_behaviour._extension_fwd"),
}


def model_of(kind):
    torch.manual_seed(0)
    return TinyViM(KINDS[kind][0]).eval()


def state(model):
    """The user's model and the code it refers to, as compile_pruned must leave them."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "attrs": {name: dict(vars(m)) for name, m in model.named_modules()},
        "globals": {"easy": THIS.selective_scan_easy, **{n: getattr(vendored_kernels, n) for n in ORIGINALS}},
        "apply": "apply" in vars(SelectiveScan) or "apply" in vars(vendored_kernels.SelectiveScanCore),
        "fwd": vendored_kernels.selective_scan_cuda_core.fwd,
        "extension_fwd": selective_scan_cuda.fwd,
        "extension_conv": causal_conv1d_cuda.causal_conv1d_fwd,
        "scan_methods": {cls: vars(cls).get("scan") for cls, _ in KINDS.values()},
        "cells": [c.cell_contents for cls, _ in KINDS.values() for c in (getattr(cls.scan, "__closure__", None) or ())],
    }


def assert_untouched(model, before, x, expected):
    after = state(model)
    for key, value in before["params"].items():
        assert torch.equal(after["params"][key], value), key
    for name, attrs in before["attrs"].items():
        assert after["attrs"][name].keys() == attrs.keys(), name
        for attr, value in attrs.items():
            assert after["attrs"][name][attr] is value, f"{name}.{attr}"
    assert after["globals"] == before["globals"] and after["globals"]["easy"] is selective_scan_easy
    assert all(getattr(vendored_kernels, n) is fn for n, fn in ORIGINALS.items())
    assert after["apply"] is before["apply"] is False
    assert after["fwd"] is before["fwd"]
    assert after["extension_fwd"] is before["extension_fwd"] is _extension_fwd
    assert after["extension_conv"] is before["extension_conv"] is _extension_conv
    assert after["scan_methods"] == before["scan_methods"]
    assert all(a is b for a, b in zip(after["cells"], before["cells"]))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@functools.lru_cache(maxsize=None)
def compiled_kind(kind):
    """(kind, model, images, its state, its outputs, ratio 0 build, ratio 0.3 build), once per kind."""
    model = model_of(kind)
    x = images()
    before = state(model)
    with torch.no_grad():
        expected = model(x)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    return kind, model, x, before, expected, dense, pruned


@pytest.fixture(params=list(KINDS))
def compiled(request):
    return compiled_kind(request.param)


def test_the_scan_is_routed_and_named(compiled):
    kind, model, x, before, expected, dense, pruned = compiled
    want = f"recognised by behaviour: {KINDS[kind][1]}"
    assert any(want in entry for entry in pruned.report.routed_scans), pruned.report.routed_scans
    lines = [line for line in str(pruned.report).splitlines() if line.startswith("recognised by behaviour: ")]
    assert lines and all("is a selective scan: it agrees with mambaprune.selective_scan" in line
                         or "is a depthwise causal conv1d: it agrees with torch's conv1d" in line for line in lines)
    assert any(KINDS[kind][1] in line for line in lines), lines
    assert len(pruned.report.blocks) == 4
    assert abs(pruned.report.achieved_ratio - 0.3) <= 0.03
    assert_untouched(model, before, x, expected)


def test_ratio_zero_is_the_model(compiled):
    kind, model, x, before, expected, dense, pruned = compiled
    with torch.no_grad():
        assert max_diff(dense(x), expected) <= TOL


def test_keep_all_is_the_model(compiled):
    kind, model, x, before, expected, dense, pruned = compiled
    keep_all = mambaprune.compile_pruned(model, schedule={k: 1.0 for k in pruned.report.sites})
    with torch.no_grad():
        assert max_diff(keep_all(x), expected) <= TOL
    assert_untouched(model, before, x, expected)


def test_pruned_is_batch_invariant_and_finite(compiled):
    kind, model, x, before, expected, dense, pruned = compiled
    with torch.no_grad():
        together = pruned(x)
        alone = torch.cat([pruned(x[i:i + 1]) for i in range(x.shape[0])])
    assert together.shape == expected.shape and torch.isfinite(together).all()
    assert max_diff(together, alone) <= TOL
    assert max_diff(together, expected) > 0   # tokens really were pruned


def test_every_scan_is_one_graph_node():
    model = model_of("autograd_function")
    captured = capture(model, (images(batch=2),))
    scans = [n for n in captured.gm.graph.nodes if n.op == "call_function" and "selective_scan" in str(n.target)]
    assert len(scans) == 4
    text = [str(r) for r in captured.recognised if r.verdict.agrees]
    assert any("SelectiveScan.apply" in t and "u=argument 0" in t and "delta_bias=argument 6" in t for t in text), text


def fresh(mixer, **kwargs):
    """A TinyViM of `mixer`, images, its state and its outputs before any compile."""
    torch.manual_seed(0)
    model = TinyViM(mixer, **kwargs).eval()
    x = images()
    before = state(model)
    with torch.no_grad():
        expected = model(x)
    return model, x, before, expected


def test_a_near_miss_is_refused_naming_it():
    model, x, before, expected = fresh(NearMissMixer)
    with pytest.raises(UnsupportedModelError, match=r"selective_scan_no_skip.*differs from mambaprune.selective_scan"):
        mambaprune.compile_pruned(model, ratio=0.3)
    assert_untouched(model, before, x, expected)


def test_a_scan_returning_its_state_is_routed_with_the_state_left_out():
    model, x, before, expected = fresh(LastStateMixer, depth=2)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    assert any("selective_scan_with_state is a selective scan" in line and "routed element by element (0: the gated "
               "output, 1: not computed (given as None))" in line for line in str(dense.report).splitlines())
    with torch.no_grad():
        assert max_diff(dense(x), expected) <= TOL
    assert_untouched(model, before, x, expected)


def test_a_model_reading_what_the_op_does_not_compute_is_refused_naming_it():
    model, x, before, expected = fresh(StateReadingMixer, depth=2)
    with pytest.raises(UnsupportedModelError, match=r"the model failed \(AttributeError: .NoneType. .*\) after "
                       r"vendored_kernels\.\w+ was routed to mambaprune.selective_scan by its behaviour; its result is a "
                       r"tuple whose elements \(0: .*, 1: not computed \(given as None\)\).* reads one it does not"):
        mambaprune.compile_pruned(model, ratio=0.3)
    assert_untouched(model, before, x, expected)


@pytest.mark.parametrize("kind", ["extension_tuple", "extension_conv"])
def test_the_extension_tuple_is_routed_element_by_element(kind):
    pruned = compiled_kind(kind)[-1]
    assert any("_extension_fwd" in r for r in pruned.report.routed_scans), pruned.report.routed_scans
    line = next(r for r in str(pruned.report).splitlines() if "_extension_fwd) is a selective scan" in r)
    assert "(0: the output before the gate, 1: not computed (given as None), 2: the gated output)" in line, line


def test_a_failed_compile_restores_everything():
    model = model_of("partial")
    x = images(batch=2)
    before = state(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="Possible sites"):
        mambaprune.compile_pruned(model, ratio=0.3, schedule={99: 0.5})
    assert_untouched(model, before, x, expected)


# -- the probe on its own -------------------------------------------------------------------------------
def scan_args(seed=0, batch=2, dim=6, length=9, d_state=3):
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(batch, dim, length, generator=g) for _ in range(3))
    A = -torch.rand(dim, d_state, generator=g) - 0.1
    B, C = (torch.randn(batch, d_state, length, generator=g) for _ in range(2))
    D, bias = torch.rand(dim, generator=g), torch.rand(dim, generator=g)
    return u, delta, A, B, C, D, z, bias


def test_the_probe_finds_the_reading_in_any_argument_order():
    u, delta, A, B, C, D, z, bias = scan_args()

    def shuffled(C, A, u, bias, z, B, D, delta):
        return vendored_kernels.selective_scan_ref(u, delta, A, B, C, D, z, bias, True)

    args = (C, A, u, bias, z, B, D, delta)
    verdict = probe(shuffled, args, {}, shuffled(*args), readings(args, {}))
    assert verdict.agrees
    r = verdict.reading
    assert (r.u.index, r.delta.index, r.A.index, r.B.index, r.C.index) == (2, 7, 1, 5, 0)
    assert (r.D.index, r.z.index, r.delta_bias.index, r.softplus) == (6, 4, 3, True)


@pytest.mark.parametrize("variant", ["no_skip", "no_gate", "sigmoid_gate", "doubled"])
def test_the_probe_rejects_other_math(variant):
    u, delta, A, B, C, D, z, bias = scan_args()
    ref = vendored_kernels.selective_scan_ref
    fn = {
        "no_skip": vendored_kernels.selective_scan_no_skip,
        "no_gate": lambda u, delta, A, B, C, D, z, bias, sp: ref(u, delta, A, B, C, D, None, bias, sp),
        "sigmoid_gate": lambda u, delta, A, B, C, D, z, bias, sp: ref(u, delta, A, B, C, D, None, bias, sp)
        * torch.sigmoid(z),
        "doubled": lambda *a: 2 * ref(*a),
    }[variant]
    args = (u, delta, A, B, C, D, z, bias, True)
    verdict = probe(fn, args, {}, fn(*args), readings(args, {}))
    assert not verdict.agrees and verdict.difference > 1e-3


def test_a_time_invariant_B_and_C_are_read_as_per_channel():
    u, delta, A, _, _, D, z, bias = scan_args()
    g = torch.Generator().manual_seed(3)
    B, C = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)

    def lti_scan(u, delta, A, B, C, D):
        per = [vendored_kernels.selective_scan_ref(u[:, d:d + 1], delta[:, d:d + 1], A[d:d + 1],
                                                   B[d][None, :, None].expand(u.shape[0], -1, u.shape[2]),
                                                   C[d][None, :, None].expand(u.shape[0], -1, u.shape[2]),
                                                   D[d:d + 1]) for d in range(u.shape[1])]
        return torch.cat(per, dim=1)

    args = (u, delta.abs(), A, B, C, D)
    verdict = probe(lti_scan, args, {}, lti_scan(*args), readings(args, {}))
    assert verdict.agrees and verdict.reading.softplus is False


def test_the_extension_conv_is_computed_as_a_causal_conv1d():
    pruned = compiled_kind("extension_conv")[-1]
    line = next(r for r in str(pruned.report).splitlines() if "_extension_conv) is a depthwise causal conv1d" in r)
    assert "weight=argument 1, bias=argument 2, then SiLU=True" in line, line
    assert not any("_extension_conv" in r for r in pruned.report.routed_scans)     # not listed as a scan
    assert "conv1d" in pruned.report.blocks[0].mixing


def test_the_conv_probe_refuses_a_centred_conv():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6)
    args = (x, weight, bias, None, True)
    candidates = conv_readings(args, {})
    assert candidates
    assert not conv_probe(_centred_conv, args, {}, _centred_conv(*args), candidates).agrees
    assert conv_probe(_extension_conv, args, {}, _extension_conv(*args), candidates).reading.silu is True
