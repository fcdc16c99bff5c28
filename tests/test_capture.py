"""Capture: routing third-party / user scans to mambaprune::selective_scan, input inference, and
that the user's model (and the code it refers to) is left exactly as it was."""
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mambaprune
from mambaprune import UnsupportedModelError
from mambaprune.capture import scan_adapters
from mambaprune.models import create_model

THIS = sys.modules[__name__]
IMG = 32


def images(batch=3, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def snapshot(model):
    """Everything compile_pruned must not change on the user's model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "instance_attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_untouched(model, before, x, expected_out):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["training"] == before["training"]
    assert after["instance_attrs"] == before["instance_attrs"]
    assert after["requires_grad"] == before["requires_grad"]
    with torch.no_grad():
        assert torch.equal(model(x), expected_out)


# ---------------------------------------------------------------------------------------------------
# 1. mambapy (real third-party code): VMambaBlock.selective_scan / selective_scan_seq are methods
# ---------------------------------------------------------------------------------------------------
mambapy_vim = pytest.importorskip("mambapy.vim")
mambapy_mamba = pytest.importorskip("mambapy.mamba")
# kept in a dict (not as module globals, which the capture would route for the duration of the export)
MAMBAPY_ORIGINALS = {
    (mambapy_vim.VMambaBlock, "selective_scan"): mambapy_vim.VMambaBlock.__dict__["selective_scan"],
    (mambapy_vim.VMambaBlock, "selective_scan_seq"): mambapy_vim.VMambaBlock.__dict__["selective_scan_seq"],
    (mambapy_mamba.MambaBlock, "selective_scan"): mambapy_mamba.MambaBlock.__dict__["selective_scan"],
    (mambapy_mamba.MambaBlock, "selective_scan_seq"): mambapy_mamba.MambaBlock.__dict__["selective_scan_seq"],
}


class MambapyViM(nn.Module):
    """mambapy's VMamba with a patch embedding, a class token at the head, and a linear head."""

    def __init__(self, dim=32, depth=4, d_state=8, patch=4, num_classes=10, declare_size=True, use_cuda=False):
        super().__init__()
        if declare_size:
            self.img_size = IMG
        self.patch = nn.Conv2d(3, dim, patch, patch)
        num_tokens = (IMG // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        config = mambapy_vim.MambaConfig(d_model=dim, n_layers=depth, d_state=d_state, use_cuda=use_cuda)
        self.backbone = mambapy_vim.VMamba(config)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.backbone(x))
        return self.head(x[:, 0])


def assert_mambapy_restored(model):
    for (cls, attr), fn in MAMBAPY_ORIGINALS.items():
        assert cls.__dict__[attr] is fn, f"{cls.__name__}.{attr} was not restored"
    for name, module in model.named_modules():
        assert "selective_scan" not in vars(module), name
        assert "selective_scan_seq" not in vars(module), name


@pytest.fixture(scope="module")
def mambapy_model():
    torch.manual_seed(0)
    return MambapyViM().eval()


@pytest.fixture(scope="module")
def mambapy_compiled(mambapy_model):
    before = snapshot(mambapy_model)
    x = images()
    with torch.no_grad():
        expected = mambapy_model(x)
    dense = mambaprune.compile_pruned(mambapy_model, ratio=0.0)
    pruned = mambaprune.compile_pruned(mambapy_model, ratio=0.3)
    return dict(model=mambapy_model, dense=dense, pruned=pruned, before=before, x=x, expected=expected)


def test_mambapy_ratio_zero_reproduces_the_model(mambapy_compiled):
    c = mambapy_compiled
    with torch.no_grad():
        out = c["dense"](c["x"])
    assert out.shape == c["expected"].shape
    assert max_diff(out, c["expected"]) <= 1e-5
    assert c["dense"].report.sites == {}


def test_mambapy_blocks_and_routed_scans_are_reported(mambapy_compiled):
    report = mambapy_compiled["dense"].report
    assert len(report.blocks) == 4
    assert report.token_length == (IMG // 4) ** 2 + 1
    assert report.routed_scans
    assert any("VMambaBlock.selective_scan" in entry for entry in report.routed_scans)
    # every mixer of the copy was routed (one per block)
    routed_mixers = {e.split(" ")[0] for e in report.routed_scans if e.endswith("VMambaBlock.selective_scan)")}
    assert {f"backbone.layers.{i}.mixer.selective_scan" for i in range(4)} <= routed_mixers
    assert "mambapy" in str(report)


def test_mambapy_ratio_is_reached_and_shape_kept(mambapy_compiled):
    c = mambapy_compiled
    report = c["pruned"].report
    assert report.sites
    assert abs(report.achieved_ratio - 0.3) <= 0.03
    assert 0 in report.protected                      # the class token is never pruned
    with torch.no_grad():
        out = c["pruned"](c["x"])
    assert out.shape == c["expected"].shape
    assert torch.isfinite(out).all()
    assert max_diff(out, c["expected"]) > 0           # something was actually pruned


def test_mambapy_methods_are_restored_and_model_untouched(mambapy_compiled):
    c = mambapy_compiled
    assert_mambapy_restored(c["model"])
    assert_untouched(c["model"], c["before"], c["x"], c["expected"])
    # the pruned model itself runs eagerly without the routing in place
    with torch.no_grad():
        assert max_diff(c["dense"](c["x"]), c["model"](c["x"])) <= 1e-5


def test_mambapy_restored_after_a_failed_compile(mambapy_model):
    x = images(batch=2)
    before = snapshot(mambapy_model)
    with torch.no_grad():
        expected = mambapy_model(x)
    with pytest.raises(ValueError, match="Possible sites"):
        mambaprune.compile_pruned(mambapy_model, ratio=0.3, schedule={99: 0.5})
    assert_mambapy_restored(mambapy_model)
    assert_untouched(mambapy_model, before, x, expected)


# ---------------------------------------------------------------------------------------------------
# 2. mamba_ssm entry points, through a fake mamba_ssm package (plain-PyTorch references)
# ---------------------------------------------------------------------------------------------------
from mamba_ssm_stub import (ref_bimamba_inner_fn, ref_mamba_inner_fn_no_out_proj,  # noqa: E402
                            ref_selective_scan_fn)
from mamba_ssm_stub import install as install_mamba_ssm  # noqa: E402

FAKE_FUNCTIONS = {
    "selective_scan_fn": ref_selective_scan_fn,
    "mamba_inner_fn_no_out_proj": ref_mamba_inner_fn_no_out_proj,
    "bimamba_inner_fn": ref_bimamba_inner_fn,
}
# The names the model code below calls, as `from mamba_ssm.ops.selective_scan_interface import ...`
# would bind them; the fixture fills them in once the fake package is installed.
selective_scan_fn = None
mamba_inner_fn_no_out_proj = None
bimamba_inner_fn = None


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    interface = install_mamba_ssm(monkeypatch)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as imported
    assert imported is ref_selective_scan_fn
    for name, fn in FAKE_FUNCTIONS.items():
        monkeypatch.setattr(THIS, name, getattr(interface, name))
    return interface


def assert_globals_restored():
    for name, fn in FAKE_FUNCTIONS.items():
        assert getattr(THIS, name) is fn, f"global {name} was not restored"
    assert THIS.ref_selective_scan_fn is FAKE_FUNCTIONS["selective_scan_fn"]
    interface = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    for name, fn in FAKE_FUNCTIONS.items():
        assert getattr(interface, name) is fn


class SSMParams(nn.Module):
    """Vim-style bidirectional mixer parameters (names as in hustvl/Vim)."""

    def __init__(self, dim, d_state, d_conv=4, expand=2, kind="selective_scan_fn"):
        super().__init__()
        self.kind, self.d_state = kind, d_state
        inner = expand * dim
        self.dt_rank = max(1, dim // 8)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        for sfx in ("", "_b"):
            setattr(self, "conv1d" + sfx, nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1))
            setattr(self, "x_proj" + sfx, nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, inner)
            nn.init.uniform_(dt_proj.bias, -4.0, -2.0)
            setattr(self, "dt_proj" + sfx, dt_proj)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_b_log = nn.Parameter(torch.log(A) + 0.1)
        self.D = nn.Parameter(torch.ones(inner))
        self.D_b = nn.Parameter(torch.full((inner,), 0.5))
        self.out_proj = nn.Linear(inner, dim)


class MambaSSMMixer(SSMParams):
    """Calls the mamba_ssm entry points through this module's globals, like Vim's mamba_simple.py."""

    def _direction(self, xz, sfx):
        conv1d, x_proj, dt_proj = (getattr(self, n + sfx) for n in ("conv1d", "x_proj", "dt_proj"))
        A = -torch.exp(getattr(self, "A_log" if not sfx else "A_b_log").float())
        D = getattr(self, "D" + sfx).float()
        if self.kind == "mamba_inner_fn_no_out_proj":
            return mamba_inner_fn_no_out_proj(xz, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, A,
                                              None, None, D, delta_bias=dt_proj.bias.float(), delta_softplus=True)
        length = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv1d(x)[..., :length])
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        return selective_scan_fn(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z,
                                 delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden):
        xz = self.in_proj(hidden).transpose(1, 2)
        if self.kind == "bimamba_inner_fn":
            A = -torch.exp(self.A_log.float())
            A_b = -torch.exp(self.A_b_log.float())
            return bimamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                    self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, A_b, None,
                                    None, self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        y = self._direction(xz, "")
        y_b = self._direction(xz.flip(-1), "_b").flip(-1)
        return self.out_proj(((y + y_b) / 2).transpose(1, 2))


class Block(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.norm = nn.LayerNorm(mixer.in_proj.in_features)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyViM(nn.Module):
    """Patch embedding, class token at the head, position embedding, blocks, norm, linear head."""

    def __init__(self, make_mixer, dim=16, depth=4, d_state=4, patch=8, num_classes=5, declare_size=True):
        super().__init__()
        if declare_size:
            self.img_size = IMG
        self.patch = nn.Conv2d(3, dim, patch, patch)
        num_tokens = (IMG // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(Block(make_mixer(dim, d_state)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def mamba_ssm_vim(kind, depth=4, **kwargs):
    torch.manual_seed(0)
    return TinyViM(lambda dim, n: MambaSSMMixer(dim, n, kind=kind), depth=depth, **kwargs).eval()


@pytest.mark.parametrize("kind", ["selective_scan_fn", "mamba_inner_fn_no_out_proj", "bimamba_inner_fn"])
def test_mamba_ssm_entry_points_are_routed(fake_mamba_ssm, kind):
    model = mamba_ssm_vim(kind)
    x = images()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    report = pruned.report
    assert any(kind in entry for entry in report.routed_scans), report.routed_scans
    assert any(f"mamba_ssm.ops.selective_scan_interface.{kind}" in entry for entry in report.routed_scans)
    assert len(report.blocks) == 4
    assert all(b.name.startswith("layers.") for b in report.blocks)
    with torch.no_grad():
        assert max_diff(pruned(x), expected) <= 1e-5
    assert_globals_restored()
    assert_untouched(model, before, x, expected)


def test_mamba_ssm_model_prunes_to_the_ratio(fake_mamba_ssm):
    model = mamba_ssm_vim("selective_scan_fn")
    x = images()
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    assert abs(pruned.report.achieved_ratio - 0.3) <= 0.03
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert_globals_restored()


def test_mamba_ssm_globals_restored_when_planning_fails(fake_mamba_ssm):
    model = mamba_ssm_vim("selective_scan_fn")
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="Possible sites"):
        mambaprune.compile_pruned(model, ratio=0.3, schedule={99: 0.5})
    assert_globals_restored()
    assert_untouched(model, before, x, expected)


def test_mambapy_with_mamba_ssm_kernel_stored_on_the_instance(fake_mamba_ssm):
    """mambapy's use_cuda=True keeps `self.selective_scan_cuda = selective_scan_fn` on each mixer."""
    torch.manual_seed(0)
    model = MambapyViM(depth=2, use_cuda=True).eval()
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert all(vars(m)["selective_scan_cuda"] is ref_selective_scan_fn for m in mixers)
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    assert {f"backbone.layers.{i}.mixer.selective_scan_cuda (mamba_ssm.ops.selective_scan_interface."
            "selective_scan_fn)" for i in range(2)} <= set(pruned.report.routed_scans)
    assert len(pruned.report.blocks) == 2
    with torch.no_grad():
        assert max_diff(pruned(x), expected) <= 1e-5
    with pytest.raises(ValueError, match="Possible sites"):
        mambaprune.compile_pruned(model, ratio=0.3, schedule={99: 0.5})
    assert all(vars(m)["selective_scan_cuda"] is ref_selective_scan_fn for m in mixers)
    assert_globals_restored()
    assert_mambapy_restored(model)
    assert_untouched(model, before, x, expected)


class LastStateMixer(MambaSSMMixer):
    """Asks for the final state, which the adapter refuses: the error is raised inside the export."""

    def _direction(self, xz, sfx):
        x, z = xz.chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())
        n, length = self.d_state, x.shape[-1]
        B = C = torch.ones(x.shape[0], n, length)
        y, _ = selective_scan_fn(x, torch.ones_like(x), A, B, C, return_last_state=True)
        return y


def test_mamba_ssm_globals_restored_when_capture_fails(fake_mamba_ssm):
    torch.manual_seed(0)
    model = TinyViM(lambda dim, n: LastStateMixer(dim, n)).eval()
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(UnsupportedModelError, match="return_last_state"):
        mambaprune.compile_pruned(model, ratio=0.3)
    assert_globals_restored()
    assert_untouched(model, before, x, expected)


# -- the adapters themselves, against the reference compositions above --------------------------------
def inner_args(seed=0, batch=2, dim=8, length=11, d_state=4, rank=2, width=4, conv_weight_2d=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.5):
        return torch.randn(*shape, generator=g) * scale

    conv_w = rnd(dim, width) if conv_weight_2d else rnd(dim, 1, width)
    return dict(
        xz=rnd(batch, 2 * dim, length, scale=1.0), conv1d_weight=conv_w, conv1d_bias=rnd(dim),
        x_proj_weight=rnd(rank + 2 * d_state, dim), delta_proj_weight=rnd(dim, rank),
        A=-torch.exp(rnd(dim, d_state)), D=rnd(dim), delta_bias=rnd(dim) - 1.0,
    )


@pytest.mark.parametrize("conv_weight_2d", [False, True])
@pytest.mark.parametrize("proj_bias", [False, True])
def test_mamba_inner_fn_no_out_proj_adapter_matches_reference(conv_weight_2d, proj_bias):
    args = inner_args(conv_weight_2d=conv_weight_2d)
    if proj_bias:
        args.update(B_proj_bias=torch.randn(4) * 0.3, C_proj_bias=torch.randn(4) * 0.3)
    got = scan_adapters.mamba_inner_fn_no_out_proj(**args, delta_softplus=True)
    want = ref_mamba_inner_fn_no_out_proj(**args, delta_softplus=True)
    assert got.shape == want.shape == (2, 8, 11)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mamba_inner_fn_no_out_proj_adapter_with_given_B_and_C():
    args = inner_args(seed=3)
    args["B"] = torch.randn(2, 4, 11)
    args["C"] = torch.randn(2, 4, 11)
    torch.testing.assert_close(scan_adapters.mamba_inner_fn_no_out_proj(**args),
                               ref_mamba_inner_fn_no_out_proj(**args), rtol=1e-4, atol=1e-5)


def test_mamba_inner_fn_adapter_is_no_out_proj_then_linear():
    args = inner_args(seed=4)
    out_w, out_b = torch.randn(6, 8), torch.randn(6)
    got = scan_adapters.mamba_inner_fn(args["xz"], args["conv1d_weight"], args["conv1d_bias"],
                                       args["x_proj_weight"], args["delta_proj_weight"], out_w, out_b, args["A"],
                                       D=args["D"], delta_bias=args["delta_bias"])
    want = F.linear(ref_mamba_inner_fn_no_out_proj(**args).transpose(1, 2), out_w, out_b)
    assert got.shape == (2, 11, 6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_bimamba_inner_fn_adapter_matches_reference(seed):
    args = inner_args(seed=seed)
    A_b = -torch.exp(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed + 10)) * 0.5)
    out_w, out_b = torch.randn(6, 8), torch.randn(6)
    positional = (args["xz"], args["conv1d_weight"], args["conv1d_bias"], args["x_proj_weight"],
                  args["delta_proj_weight"], out_w, out_b, args["A"], A_b)
    got = scan_adapters.bimamba_inner_fn(*positional, None, None, args["D"], delta_bias=args["delta_bias"],
                                         delta_softplus=True)
    want = ref_bimamba_inner_fn(*positional, None, None, args["D"], delta_bias=args["delta_bias"],
                                delta_softplus=True)
    assert got.shape == want.shape == (2, 11, 6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_selective_scan_fn_adapter_matches_reference(grouped):
    g = torch.Generator().manual_seed(5)
    batch, dim, length, n = 2, 8, 13, 4
    u, delta, z = (torch.randn(batch, dim, length, generator=g) for _ in range(3))
    A = -torch.rand(dim, n, generator=g) - 0.5
    shape = (batch, 2, n, length) if grouped else (batch, n, length)
    B, C = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    for kwargs in (dict(), dict(D=D), dict(D=D, z=z, delta_bias=bias, delta_softplus=True)):
        got = scan_adapters.selective_scan_fn(u, delta.sigmoid() if not kwargs else delta, A, B, C, **kwargs)
        want = ref_selective_scan_fn(u, delta.sigmoid() if not kwargs else delta, A, B, C, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_selective_scan_fn_adapter_refuses_the_final_state():
    u = torch.randn(1, 4, 5)
    with pytest.raises(UnsupportedModelError, match="return_last_state"):
        scan_adapters.selective_scan_fn(u, u, -torch.ones(4, 2), torch.ones(1, 2, 5), torch.ones(1, 2, 5),
                                         return_last_state=True)


# ---------------------------------------------------------------------------------------------------
# 3. register_scan: hand-written scans (a Python loop, a function or a method)
# ---------------------------------------------------------------------------------------------------
# loop_scan is a global of this module (imported): the routing replaces it where the mixers look it up
from loop_scans import loop_scan, loop_scan_adapter  # noqa: E402


class LoopMixer(SSMParams):
    """Bidirectional mixer in (B, L, D) layout whose scan is the module-level `loop_scan`."""

    def _direction(self, h, sfx):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        conv1d, x_proj, dt_proj = (getattr(self, n + sfx) for n in ("conv1d", "x_proj", "dt_proj"))
        x = F.silu(conv1d(x.transpose(1, 2))[..., :h.shape[1]]).transpose(1, 2)
        dt, B, C = torch.split(x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(dt_proj(dt))
        A = -torch.exp(getattr(self, "A_log" if not sfx else "A_b_log"))
        return self.scan(x, delta, A, B, C, getattr(self, "D" + sfx)) * F.silu(z)

    def scan(self, u, delta, A, B, C, D):
        return loop_scan(u, delta, A, B, C, D)

    def forward(self, h):
        y = self._direction(h, "")
        y_b = self._direction(h.flip(1), "_b").flip(1)
        return self.out_proj((y + y_b) / 2)


class MethodMixer(LoopMixer):
    """The scan is a method of its own class (a function object distinct from LoopMixer.scan)."""

    def scan(self, u, delta, A, B, C, D):
        return loop_scan(u, delta, A, B, C, D)


class StaticMixer(LoopMixer):
    """The scan is a staticmethod: `register_scan(StaticMixer.scan, ...)` receives the plain function."""

    @staticmethod
    def scan(u, delta, A, B, C, D):
        return loop_scan(u, delta, A, B, C, D)


def method_adapter(self, u, delta, A, B, C, D):
    assert isinstance(self, MethodMixer)
    return loop_scan_adapter(u, delta, A, B, C, D)


def loop_vim(mixer_cls, depth=4):
    torch.manual_seed(0)
    return TinyViM(lambda dim, n: mixer_cls(dim, n), depth=depth).eval()


@pytest.fixture
def registered():
    done = []

    def register(fn, adapter):
        done.append(fn)
        return mambaprune.register_scan(fn, adapter)

    yield register
    for fn in done:
        mambaprune.unregister_scan(fn)


def test_hand_written_scan_without_registration_is_lifted_and_pruned():
    """loop_scan's unrolled token loop is lifted into one scan per direction (capture/token_loops.py)."""
    model = loop_vim(LoopMixer, depth=2)
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
        fast = mambaprune.compile_pruned(model, ratio=0.0)
        assert (fast(x) - expected).abs().max() <= 1e-5
    assert "Python token loop, lifted into one scan x4" in str(fast.report)
    assert_untouched(model, before, x, expected)


def sigmoid_decay_loop(u, delta, A, B, C, D):
    """A recurrence that is no selective scan (the decay is sigmoid(delta * A), not exp): not lifted."""
    h, ys = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]), []
    for t in range(u.shape[1]):
        h = torch.sigmoid(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + D * u


def test_hand_written_recurrence_that_is_no_scan_names_the_module(monkeypatch):
    monkeypatch.setattr(THIS, "loop_scan", sigmoid_decay_loop)
    model = loop_vim(LoopMixer, depth=2)
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(UnsupportedModelError, match="register_scan") as info:
        mambaprune.compile_pruned(model, ratio=0.3)
    message = str(info.value)
    assert "layers.0.mixer" in message
    assert "A_log" in message
    assert_untouched(model, before, x, expected)


def test_registered_function_scan_compiles_and_prunes(registered):
    scan = loop_scan
    assert registered(scan, loop_scan_adapter) is scan
    model = loop_vim(LoopMixer)
    x = images()
    with torch.no_grad():
        expected = model(x)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    assert len(dense.report.blocks) == 4
    assert any("loop_scan" in e and "register_scan" in e for e in dense.report.routed_scans)
    with torch.no_grad():
        assert max_diff(dense(x), expected) <= 1e-5
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    assert abs(pruned.report.achieved_ratio - 0.3) <= 0.03
    with torch.no_grad():
        assert pruned(x).shape == expected.shape
    assert THIS.loop_scan is scan                          # the routed global is the function again


def test_registered_method_scan_compiles(registered):
    registered(MethodMixer.scan, method_adapter)
    original = MethodMixer.__dict__["scan"]
    model = loop_vim(MethodMixer)
    x = images()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    assert any(e.endswith("mixer.scan (register_scan)") for e in dense.report.routed_scans)
    assert len(dense.report.blocks) == 4
    with torch.no_grad():
        assert max_diff(dense(x), expected) <= 1e-5
    assert MethodMixer.__dict__["scan"] is original
    assert all("scan" not in vars(m) for m in model.modules())
    assert_untouched(model, before, x, expected)


def test_registered_staticmethod_scan_is_routed(registered):
    registered(StaticMixer.scan, loop_scan_adapter)
    model = loop_vim(StaticMixer, depth=2)
    x = images(batch=2)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    assert len(dense.report.blocks) == 2
    with torch.no_grad():
        assert max_diff(dense(x), model(x)) <= 1e-5
    assert isinstance(StaticMixer.__dict__["scan"], staticmethod)


def test_unregister_scan_removes_the_entry():
    from mambaprune.capture import known_entries
    mambaprune.register_scan(loop_scan, loop_scan_adapter)
    try:
        mambaprune.register_scan(loop_scan, method_adapter)        # registering again replaces the adapter
        mine = [e for e in known_entries() if e.fn is loop_scan]
        assert len(mine) == 1 and mine[0].adapter is method_adapter
    finally:
        mambaprune.unregister_scan(loop_scan)
    assert not [e for e in known_entries() if e.fn is loop_scan]
    mambaprune.unregister_scan(loop_scan)                          # unregistering twice is harmless


def test_register_scan_needs_callables():
    with pytest.raises(TypeError, match="two callables"):
        mambaprune.register_scan(loop_scan, "adapter")
    with pytest.raises(TypeError, match="two callables"):
        mambaprune.register_scan(None, loop_scan_adapter)


# ---------------------------------------------------------------------------------------------------
# 4. example_inputs inference
# ---------------------------------------------------------------------------------------------------
def test_example_inputs_are_inferred_from_img_size(registered):
    registered(loop_scan, loop_scan_adapter)
    model = loop_vim(LoopMixer, depth=2)
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    x = images(batch=2)
    with torch.no_grad():
        assert max_diff(pruned(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 32, 32\)"):
        pruned(images(batch=1, size=16))


def test_example_inputs_inferred_from_patch_embed_img_size():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=(32, 16), patch_size=8, depth=2, embed_dim=16, d_state=4).eval()
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert max_diff(pruned(x), model(x)) <= 1e-5


def test_model_without_declared_size_asks_for_example_inputs(registered):
    registered(loop_scan, loop_scan_adapter)
    torch.manual_seed(0)
    model = TinyViM(lambda dim, n: LoopMixer(dim, n), depth=2, declare_size=False).eval()
    assert not hasattr(model, "img_size")
    with pytest.raises(ValueError, match="example_inputs") as info:
        mambaprune.compile_pruned(model, ratio=0.3)
    assert not isinstance(info.value, UnsupportedModelError)
    # with inputs it compiles
    x = images(batch=1)
    pruned = mambaprune.compile_pruned(model, ratio=0.0, example_inputs=(x,))
    with torch.no_grad():
        assert max_diff(pruned(images(batch=2)), model(images(batch=2))) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# 5. the user's model is never modified
# ---------------------------------------------------------------------------------------------------
def test_reference_model_untouched_after_success_and_failure():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4).train()
    x = images(batch=2)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    assert pruned.report.sites
    assert model.training                                  # capture evaluates a private copy
    assert_untouched(model, before, x, expected)
    with pytest.raises(ValueError, match="Possible sites"):
        mambaprune.compile_pruned(model, ratio=0.3, schedule={99: 0.5})
    assert_untouched(model, before, x, expected)
    with pytest.raises(ValueError):
        mambaprune.compile_pruned(model, ratio=0.3, example_inputs=(torch.randn(1, 3, 24, 24),))
    assert_untouched(model, before, x, expected)
    # the pruned model shares no storage with the user's model
    ours = {p.data_ptr() for p in model.state_dict().values()}
    theirs = {t.data_ptr() for t in pruned.graph_module.state_dict().values()}
    assert not ours & theirs
