"""GroupMamba's ss2d: VMamba's SS2D, forward type v2 only, cross-scan / merge passed in by the caller."""
import math
from functools import partial

import torch
import torch.nn as nn
from einops import repeat

from .csms6s import SelectiveScanCore


class mamba_init:
    @staticmethod
    def dt_init(dt_rank, d_inner, dt_scale=1.0, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            dt = dt.clamp(min=dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        return dt_proj

    @staticmethod
    def A_log_init(d_state, d_inner, copies=-1):
        A_log = torch.log(repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=d_inner))
        return nn.Parameter(repeat(A_log, "d n -> r d n", r=copies).flatten(0, 1))

    @staticmethod
    def D_init(d_inner, copies=-1):
        return nn.Parameter(repeat(torch.ones(d_inner), "n1 -> r n1", r=copies).flatten(0, 1))


class SS2D(nn.Module, mamba_init):
    def __init__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", act_layer=nn.SiLU, d_conv=3,
                 conv_bias=True, bias=False, forward_type="v2", **kwargs):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.channel_first = False
        self.disable_z = self.disable_z_act = False
        self.out_norm = nn.LayerNorm(d_inner)
        self.forward_core = partial(self.forward_corev2, force_fp32=True, SelectiveScan=SelectiveScanCore)
        k_group = 1
        self.in_proj = nn.Linear(d_model, d_inner * 2, bias=bias)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, groups=d_inner, bias=conv_bias, kernel_size=d_conv,
                                padding=(d_conv - 1) // 2)
        self.x_proj_weight = nn.Parameter(torch.stack([nn.Linear(d_inner, dt_rank + d_state * 2, bias=False).weight
                                                       for _ in range(k_group)], dim=0))
        self.out_act = nn.Identity()
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Identity()
        dt_projs = [self.dt_init(dt_rank, d_inner) for _ in range(k_group)]
        self.dt_projs_weight = nn.Parameter(torch.stack([t.weight for t in dt_projs], dim=0))
        self.dt_projs_bias = nn.Parameter(torch.stack([t.bias for t in dt_projs], dim=0))
        self.A_logs = self.A_log_init(d_state, d_inner, copies=k_group)
        self.Ds = self.D_init(d_inner, copies=k_group)

    def forward_corev2(self, x, to_dtype=True, force_fp32=False, ssoflex=True, SelectiveScan=None, CrossScan=None,
                       CrossMerge=None, **kwargs):
        x_proj_weight, dt_projs_weight, dt_projs_bias = self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias
        A_logs, Ds, delta_softplus, out_norm = self.A_logs, self.Ds, True, self.out_norm
        B, D, H, W = x.shape
        D, N = A_logs.shape
        K, D, R = dt_projs_weight.shape
        L = H * W

        def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
            return SelectiveScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, -1, -1, ssoflex)

        xs = CrossScan.apply(x)
        x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs, x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts, dt_projs_weight)
        xs = xs.view(B, -1, L)
        dts = dts.contiguous().view(B, -1, L)
        As = -torch.exp(A_logs.to(torch.float))
        Bs = Bs.contiguous().view(B, K, N, L)
        Cs = Cs.contiguous().view(B, K, N, L)
        Ds = Ds.to(torch.float)
        delta_bias = dt_projs_bias.view(-1).to(torch.float)
        if force_fp32:
            xs, dts, Bs, Cs = (t.to(torch.float32) for t in (xs, dts, Bs, Cs))
        ys = selective_scan(xs, dts, As, Bs, Cs, Ds, delta_bias, delta_softplus).view(B, K, -1, H, W)
        y = CrossMerge.apply(ys)
        y = y.view(B, -1, H, W)
        y = y.view(B, -1, H * W).transpose(dim0=1, dim1=2).contiguous().view(B, H, W, -1)
        y = out_norm(y)
        return y.to(x.dtype) if to_dtype else y

    def forward(self, x, CrossScan, CrossMerge, **kwargs):
        x = self.in_proj(x)
        x, z = x.chunk(2, dim=-1)
        z = self.act(z)
        x = x.permute(0, 3, 1, 2).contiguous()
        x = self.act(self.conv2d(x))
        y = self.forward_core(x, CrossScan=CrossScan, CrossMerge=CrossMerge)
        y = self.out_act(y)
        return self.dropout(self.out_proj(y * z))
