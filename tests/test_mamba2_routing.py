"""Mamba-2 (SSD) entry points routed to mambaprune::ssd_scan during capture.

The CUDA-only functions of mamba_ssm are stand-ins (tests/ssd_stub.py: the chunked SSD in plain
PyTorch, with mamba_ssm's signatures), installed as the mamba_ssm package; HF transformers'
Mamba2Mixer is a stand-in class installed as transformers.models.mamba2.modeling_mamba2. The models
below call them as the authors' code does (mamba_ssm's Mamba2 module, both of its paths; the
minimal SSD; the HF mixer's torch_forward), and the routed model must compute what the model
computes with the stand-ins.
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mambaprune
import ssd_stub
from mamba_ssm_stub import install as install_mamba_ssm
from mambaprune.api.compile import prepare
from mambaprune.capture import ssd_adapters
from mambaprune.errors import UnsupportedModelError

THIS = sys.modules[__name__]
IMG, PATCH = 32, 8
# bound by the fixture, as `from mamba_ssm.ops.triton.ssd_combined import ...` would bind them
mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = ssd_minimal_discrete = selective_state_update = None
causal_conv1d_fn = None
STUBS = {"causal_conv1d_fn": ssd_stub.causal_conv1d_fn,"mamba_chunk_scan_combined": ssd_stub.mamba_chunk_scan_combined,
         "mamba_split_conv1d_scan_combined": ssd_stub.mamba_split_conv1d_scan_combined,
         "ssd_minimal_discrete": ssd_stub.ssd_minimal_discrete,
         "selective_state_update": ssd_stub.selective_state_update}


class GatedRMSNorm(nn.Module):
    """mamba_ssm's layernorm_gated.RMSNorm: norm(x, z), grouped, gate before or after the norm."""

    def __init__(self, dim, eps=1e-5, norm_before_gate=False, group_size=None):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(dim)), eps
        self.norm_before_gate, self.group_size = norm_before_gate, group_size

    def forward(self, x, z=None):
        return ssd_stub.rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


class Mamba2(nn.Module):
    """The forward of mamba_ssm's Mamba2 module without inference caches: the fused path
    (use_mem_eff_path) or the split one (causal_conv1d_fn, then mamba_chunk_scan_combined)."""

    def __init__(self, d_model, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, use_mem_eff_path=True,
                 chunk_size=8, norm_before_gate=False):
        super().__init__()
        self.d_inner, self.d_state, self.headdim, self.ngroups = expand * d_model, d_state, headdim, ngroups
        self.nheads, self.chunk_size, self.use_mem_eff_path = self.d_inner // headdim, chunk_size, use_mem_eff_path
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads) + 0.1 * torch.randn(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, norm_before_gate=norm_before_gate,
                                 group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u):
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())
        if self.use_mem_eff_path:
            return mamba_split_conv1d_scan_combined(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, D=self.D,
                chunk_size=self.chunk_size, seq_idx=None, activation="silu", rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
                headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=self.norm.norm_before_gate)
        batch, length, _ = u.shape
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                          self.nheads], dim=-1)
        xBC = causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                               activation="silu").transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = mamba_chunk_scan_combined(
            x.reshape(batch, length, self.nheads, self.headdim), dt, A,
            B.reshape(batch, length, self.ngroups, self.d_state), C.reshape(batch, length, self.ngroups, self.d_state),
            chunk_size=self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, dt_softplus=True, seq_idx=None)
        return self.out_proj(self.norm(y.reshape(batch, length, -1), z))


class MinimalSSD(Mamba2):
    """The Mamba2 mixer with its scan written as the minimal chunked SSD (mamba_ssm's ssd_minimal test):
    discretised inputs X = x * dt, A * dt, B and C per head."""

    def forward(self, u):
        batch, length, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                   self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(batch, length, self.nheads, self.headdim)
        B, C = (t.reshape(batch, length, self.ngroups, self.d_state).repeat_interleave(self.nheads // self.ngroups, 2)
                for t in (B, C))
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        y, _ = ssd_minimal_discrete(x * dt.unsqueeze(-1), A * dt, B, C, self.chunk_size)
        y = y + self.D[:, None] * x
        return self.out_proj(self.norm(y.reshape(batch, length, -1), z))


class HFMamba2Mixer(nn.Module):
    """HF transformers' Mamba2Mixer (its attribute names), the chunked pure-PyTorch path only."""

    def __init__(self, hidden_size, state_size=8, expand=2, head_dim=8, n_groups=2, chunk_size=8, conv_kernel=4):
        super().__init__()
        self.intermediate_size, self.ssm_state_size, self.head_dim = expand * hidden_size, state_size, head_dim
        self.n_groups, self.chunk_size, self.num_heads = n_groups, chunk_size, expand * hidden_size // head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.conv_kernel_size, self.time_step_min = conv_kernel, 1e-3
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                padding=conv_kernel - 1)
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(torch.linspace(-6, -1, self.num_heads))   # some steps clamped to time_step_min
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, eps=1e-6, group_size=self.intermediate_size // n_groups)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states, cache_params=None, cache_position=None, attention_mask=None):
        return self.torch_forward(hidden_states, cache_params, cache_position, attention_mask)

    def torch_forward(self, input_states, cache_params=None, cache_position=None, attention_mask=None):
        batch, length, _ = input_states.shape
        _, _, gate, hidden, dt = self.in_proj(input_states).split(
            [0, 0, self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        hidden = self.act(self.conv1d(hidden.transpose(1, 2))[..., :length].transpose(1, 2))
        groups_n = self.n_groups * self.ssm_state_size
        x, B, C = torch.split(hidden, [self.intermediate_size, groups_n, groups_n], dim=-1)
        dt = torch.clamp(F.softplus(dt + self.dt_bias), self.time_step_min)
        x = x.reshape(batch, length, -1, self.head_dim).float()
        B, C = (t.reshape(batch, length, -1, self.ssm_state_size).float()
                .repeat_interleave(self.num_heads // self.n_groups, dim=2) for t in (B, C))
        y, _ = ssd_stub.chunked_ssd(x * dt[..., None], -torch.exp(self.A_log.float()) * dt, B, C, self.chunk_size)
        y = (y + self.D[:, None] * x).reshape(batch, length, -1)
        return self.out_proj(self.norm(y, gate))


class StepLoop(Mamba2):
    """A scan written as one selective_state_update per token (a decoding loop)."""

    def forward(self, u):
        batch, length, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                   self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        state = u.new_zeros(batch, self.nheads, self.headdim, self.d_state)
        A = (-torch.exp(self.A_log.float()))[:, None, None].expand(self.nheads, self.headdim, self.d_state)
        ys = [selective_state_update(state, x[:, t].reshape(batch, self.nheads, self.headdim),
                                     dt[:, t, :, None].expand(batch, self.nheads, self.headdim), A,
                                     B[:, t].reshape(batch, self.ngroups, -1), C[:, t].reshape(batch, self.ngroups, -1),
                                     self.D[:, None].expand(self.nheads, self.headdim),
                                     dt_bias=self.dt_bias[:, None].expand(self.nheads, self.headdim), dt_softplus=True)
              for t in range(length)]
        return self.out_proj(self.norm(torch.stack(ys, 1).reshape(batch, length, -1), z))


class Block(nn.Module):
    def __init__(self, dim, mixer):
        super().__init__()
        self.norm, self.mixer = nn.LayerNorm(dim), mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyMamba2ViT(nn.Module):
    """Patch embedding, middle class token, position embedding, Mamba-2 blocks, norm, linear head."""

    def __init__(self, make_mixer, dim=16, depth=4, num_classes=5):
        super().__init__()
        self.img_size = IMG
        self.patch = nn.Conv2d(3, dim, PATCH, PATCH)
        self.middle = (IMG // PATCH) ** 2 // 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (IMG // PATCH) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, make_mixer(dim)) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        m = self.middle
        x = torch.cat([x[:, :m], self.cls_token.expand(x.shape[0], -1, -1), x[:, m:]], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, m])


HF_TORCH_FORWARD = HFMamba2Mixer.torch_forward
KINDS = {
    "mamba_split_conv1d_scan_combined": lambda d: Mamba2(d, use_mem_eff_path=True),
    "mamba_chunk_scan_combined": lambda d: Mamba2(d, use_mem_eff_path=False),
    "ssd_minimal_discrete": lambda d: MinimalSSD(d),
    "Mamba2Mixer.torch_forward": lambda d: HFMamba2Mixer(d),
    "selective_state_update": lambda d: StepLoop(d),
}
ORIGINS = {"mamba_split_conv1d_scan_combined": "mamba_ssm.ops.triton.ssd_combined",
           "mamba_chunk_scan_combined": "mamba_ssm.ops.triton.ssd_combined",
           "ssd_minimal_discrete": "mamba_ssm.modules.ssd_minimal",
           "Mamba2Mixer.torch_forward": "transformers.models.mamba2.modeling_mamba2"}


@pytest.fixture
def stand_ins(monkeypatch):
    install_mamba_ssm(monkeypatch)
    monkeypatch.setitem(sys.modules, "causal_conv1d", ssd_stub.causal_conv1d_module())
    for name in STUBS:
        monkeypatch.setattr(THIS, name, STUBS[name])
    hf = {name: types.ModuleType(name) for name in ("transformers", "transformers.models",
                                                     "transformers.models.mamba2",
                                                     "transformers.models.mamba2.modeling_mamba2")}
    hf["transformers.models.mamba2.modeling_mamba2"].Mamba2Mixer = HFMamba2Mixer
    for name, module in hf.items():
        monkeypatch.setitem(sys.modules, name, module)


def build(kind, depth=4):
    torch.manual_seed(0)
    return TinyMamba2ViT(KINDS[kind], depth=depth).eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()}}


def assert_untouched(model, before, x, expected):
    after = snapshot(model)
    assert after["attrs"] == before["attrs"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    for name, fn in STUBS.items():
        assert getattr(THIS, name) is fn, f"global {name} was not restored"
    assert vars(HFMamba2Mixer)["torch_forward"] is HF_TORCH_FORWARD
    with torch.no_grad():
        assert torch.equal(model(x), expected)


ROUTED = [kind for kind in KINDS if kind != "selective_state_update"]


@pytest.mark.parametrize("kind", ROUTED)
def test_each_entry_point_is_routed_to_one_ssd_scan_node_per_call(stand_ins, kind):
    model, x = build(kind), images()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    captured = prepare(model).captured.gm
    targets = [n.target for n in captured.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.mambaprune.ssd_scan.default) == 4
    assert torch.ops.mambaprune.selective_scan.default not in targets
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    assert any(f"{ORIGINS[kind]}.{kind}" in entry for entry in pruned.report.routed_scans), pruned.report.routed_scans
    assert len(pruned.report.blocks) == 4
    with torch.no_grad():
        # the stand-in is the chunked SSD, our op a token loop: equal up to fp32 rounding
        assert torch.allclose(pruned(x), expected, atol=1e-5, rtol=1e-4)
    assert_untouched(model, before, x, expected)


@pytest.mark.parametrize("kind", ROUTED)
def test_keep_all_is_dense_and_a_pruned_model_is_batch_invariant(stand_ins, kind):
    model, x = build(kind), images(batch=4)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    keep_all = mambaprune.compile_pruned(model, schedule={1: 1.0, 2: 1.0})
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    assert abs(pruned.report.achieved_ratio - 0.3) <= 0.05
    with torch.no_grad():
        assert torch.allclose(keep_all(x), expected, atol=1e-5, rtol=1e-4)
        together = pruned(x)
        one_by_one = torch.cat([pruned(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(together, one_by_one, atol=1e-6, rtol=1e-5)
    assert "masked dense run" in str(pruned.report)   # verified against the masked dense graph
    assert_untouched(model, before, x, expected)


def test_a_loop_of_selective_state_updates_is_refused_by_name(stand_ins):
    model, x = build("selective_state_update", depth=2), images(batch=2)
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="selective_state_update .*one-token decoding step"):
        mambaprune.compile_pruned(model, ratio=0.0)
    assert_untouched(model, before, x, expected)


# -- the adapters against the stand-ins, option by option --------------------------------------------
def split_inputs(d_nonssm=0, ngroups=2, heads=4, headdim=4, dstate=3, width=4, length=11, batch=2):
    torch.manual_seed(3)
    dim = heads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    zxbcdt = torch.randn(batch, length, 2 * d_nonssm + dim + conv_dim + heads)
    return dict(zxbcdt=zxbcdt, conv1d_weight=torch.randn(conv_dim, width) * 0.3, conv1d_bias=torch.randn(conv_dim),
                dt_bias=torch.randn(heads) - 2, A=-torch.rand(heads) * 4 - 0.5, D=torch.randn(heads), chunk_size=4,
                headdim=headdim, ngroups=ngroups)


@pytest.mark.parametrize("options", [
    dict(),
    dict(rmsnorm=True, norm_before_gate=True),
    dict(rmsnorm=True, norm_before_gate=False, d_nonssm=3),
    dict(outproj=True, dt_limit=(0.05, 0.5)),
    dict(D_per_channel=True, rmsnorm=True, outproj=True),
])
def test_split_conv1d_scan_adapter_computes_the_fused_path(options):
    args = split_inputs(d_nonssm=options.get("d_nonssm", 0))
    dim = args["D"].shape[0] * args["headdim"]
    if options.get("D_per_channel"):
        args["D"], args["headdim"] = torch.randn(args["D"].shape[0], args["headdim"]), None
    if options.get("rmsnorm"):
        args.update(rmsnorm_weight=torch.rand(dim) + 0.5, rmsnorm_eps=1e-5,
                    norm_before_gate=options.get("norm_before_gate", True))
    if options.get("outproj"):
        out_dim = dim + options.get("d_nonssm", 0)
        args.update(outproj_weight=torch.randn(5, out_dim), outproj_bias=torch.randn(5))
    if "dt_limit" in options:
        args["dt_limit"] = options["dt_limit"]
    expected = ssd_stub.mamba_split_conv1d_scan_combined(**args)
    assert torch.allclose(ssd_adapters.mamba_split_conv1d_scan_combined(**args), expected, atol=1e-5, rtol=1e-4)


def test_minimal_ssd_adapter_computes_the_outputs_and_refuses_a_use_of_the_final_state():
    torch.manual_seed(4)
    batch, length, heads, headdim, dstate = 2, 13, 3, 4, 5
    dt = F.softplus(torch.randn(batch, length, heads))
    X = torch.randn(batch, length, heads, headdim) * dt[..., None]
    A = -torch.rand(heads) * 3 * dt
    B, C = torch.randn(batch, length, heads, dstate), torch.randn(batch, length, heads, dstate)
    Y, final = ssd_adapters.ssd_minimal_discrete(X, A, B, C, 4)
    assert torch.allclose(Y, ssd_stub.ssd_minimal_discrete(X, A, B, C, 4)[0], atol=1e-5, rtol=1e-4)
    for use in (lambda s: s * 2, lambda s: s.shape, lambda s: torch.einsum("bhpn->bh", s), lambda s: s[0]):
        with pytest.raises(UnsupportedModelError, match="final state returned by ssd_minimal_discrete"):
            use(final)


def test_stand_in_chunked_ssd_is_the_token_loop():
    """The stand-in (chunked) and mambaprune's reference (token loop) agree: the routing tests compare
    two independent formulations."""
    torch.manual_seed(5)
    x, dt = torch.randn(2, 10, 4, 3), torch.randn(2, 10, 4)
    A, B, C = -torch.rand(4) * 2, torch.randn(2, 10, 2, 5), torch.randn(2, 10, 2, 5)
    D, z, bias = torch.randn(4), torch.randn(2, 10, 4, 3), torch.randn(4)
    expected = mambaprune.runtime.ssd_scan_reference(x, dt, A, B, C, D, z, bias, True)
    got = ssd_stub.mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, dt_softplus=True)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", ["initial_states", "seq_idx", "return_final_states"])
def test_chunk_scan_adapter_refuses_what_the_op_cannot_return(option):
    x, dt, A = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2), -torch.rand(2)
    B = C = torch.randn(1, 4, 1, 3)
    value = {"initial_states": torch.zeros(1, 2, 3, 3), "seq_idx": torch.zeros(1, 4, dtype=torch.int32),
             "return_final_states": True}[option]
    with pytest.raises(UnsupportedModelError, match=f"mamba_chunk_scan_combined with {option}"):
        ssd_adapters.mamba_chunk_scan_combined(x, dt, A, B, C, 4, **{option: value})
