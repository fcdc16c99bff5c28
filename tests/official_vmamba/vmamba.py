"""vmamba: VSSM / VSSBlock / SS2D and the released configs (see the package docstring).

SS2D forward types reproduced: "v0" (SS2Dv0: channels-last, cat + flip cross-scan, einsum x_proj,
the scan through `selective_scan_fn(..., backend="mamba")`), and the v2 family through
`forward_corev2` with scan_mode "cross2d" ("v05_noz" as released: conv1d x_proj, no z, LayerNorm2d
when channel-first; "v05", "v2", "v3" ...). The mamba2 ("m0") and "xv" types are not reproduced.
"""
import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .csm_triton import cross_merge_fn, cross_scan_fn
from .csms6s import selective_scan_fn


class DropPath(nn.Module):
    """timm's DropPath (identity at eval)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class Linear2d(nn.Linear):
    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchMerging2D(nn.Module):
    def __init__(self, dim, out_dim=-1, norm_layer=nn.LayerNorm, channel_first=False):
        super().__init__()
        Linear = Linear2d if channel_first else nn.Linear
        self.channel_first = channel_first
        self.reduction = Linear(4 * dim, (2 * dim) if out_dim < 0 else out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        if self.channel_first:
            parts = [x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]]
            x = torch.cat(parts, 1)
        else:
            parts = [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]]
            x = torch.cat(parts, -1)
        return self.reduction(self.norm(x))


class Permute(nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.args = args

    def forward(self, x):
        return x.permute(*self.args)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 channels_first=False):
        super().__init__()
        Linear = Linear2d if channels_first else nn.Linear
        self.fc1 = Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class mamba_init:
    @staticmethod
    def dt_init(dt_rank, d_inner, dt_scale=1.0, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        return dt_proj

    @classmethod
    def init_dt_A_D(cls, d_state, dt_rank, d_inner, dt_scale=1.0, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                    k_group=4):
        projs = [cls.dt_init(dt_rank, d_inner, dt_scale, dt_min, dt_max, dt_init_floor) for _ in range(k_group)]
        dt_projs_weight = nn.Parameter(torch.stack([p.weight for p in projs], dim=0))   # (K, inner, rank)
        dt_projs_bias = nn.Parameter(torch.stack([p.bias for p in projs], dim=0))       # (K, inner)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).view(1, -1).repeat(d_inner, 1)
        A_logs = nn.Parameter(torch.log(A).repeat(k_group, 1))                         # (K * inner, N)
        Ds = nn.Parameter(torch.ones(k_group * d_inner))                                # (K * inner)
        return A_logs, Ds, dt_projs_weight, dt_projs_bias


def _x_proj_weight(k_group, d_inner, out_features):
    projs = [nn.Linear(d_inner, out_features, bias=False) for _ in range(k_group)]
    return nn.Parameter(torch.stack([p.weight for p in projs], dim=0))                 # (K, R + 2N, inner)


class SS2Dv0:
    def __initv0__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", dropout=0.0, seq=False,
                   force_fp32=True, **kwargs):
        nn.Module.__init__(self)
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.forward = partial(self.forwardv0, seq=seq, force_fp32=force_fp32)
        self.in_proj = nn.Linear(d_model, d_inner * 2, bias=False)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=3, padding=1, groups=d_inner, bias=True)
        self.x_proj_weight = _x_proj_weight(4, d_inner, dt_rank + d_state * 2)
        self.A_logs, self.Ds, self.dt_projs_weight, self.dt_projs_bias = mamba_init.init_dt_A_D(
            d_state, dt_rank, d_inner, k_group=4)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    def forwardv0(self, x, seq=False, force_fp32=True, **kwargs):
        x, gate = self.in_proj(x).chunk(2, dim=-1)                     # channels-last (B, H, W, 2 * inner)
        gate = self.act(gate)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))  # (B, inner, H, W)
        scan = partial(selective_scan_fn, backend="mamba")
        batch, _, height, width = x.shape
        n_state = self.A_logs.shape[1]
        groups, _, rank = self.dt_projs_weight.shape
        tokens = height * width

        # the four directions: row-major, column-major (stack), then both reversed (cat + flip)
        flat = [x.view(batch, -1, tokens), torch.transpose(x, dim0=2, dim1=3).contiguous().view(batch, -1, tokens)]
        forward_dirs = torch.stack(flat, dim=1).view(batch, 2, -1, tokens)
        xs = torch.cat([forward_dirs, torch.flip(forward_dirs, dims=[-1])], dim=1)    # (B, 4, inner, L)
        dts, Bs, Cs = torch.split(torch.einsum("b k d l, k c d -> b k c l", xs, self.x_proj_weight),
                                  [rank, n_state, n_state], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts, self.dt_projs_weight)
        us, dts = xs.view(batch, -1, tokens), dts.contiguous().view(batch, -1, tokens)
        Bs, Cs = Bs.contiguous(), Cs.contiguous()
        As, Ds = -self.A_logs.float().exp(), self.Ds.float()
        bias = self.dt_projs_bias.float().view(-1)
        if force_fp32:
            us, dts, Bs, Cs = (t.to(torch.float32) for t in (us, dts, Bs, Cs))
        if seq:   # one scan per direction, on that direction's slices
            per = lambda t, k: t.view(batch, groups, -1, tokens)[:, k]                   # noqa: E731
            parts = [scan(per(us, k), per(dts, k), As.view(groups, -1, n_state)[k], Bs[:, k].unsqueeze(1),
                          Cs[:, k].unsqueeze(1), Ds.view(groups, -1)[k], delta_bias=bias.view(groups, -1)[k],
                          delta_softplus=True).view(batch, -1, tokens) for k in range(4)]
            ys = torch.stack(parts, dim=1)
        else:
            ys = scan(us, dts, As, Bs, Cs, Ds, delta_bias=bias, delta_softplus=True).view(batch, groups, -1, tokens)

        # back to row-major order: un-flip directions 2-3, un-transpose directions 1 and 3
        unflipped = torch.flip(ys[:, 2:4], dims=[-1]).view(batch, 2, -1, tokens)
        untranspose = lambda t: torch.transpose(t.view(batch, -1, width, height), dim0=2, dim1=3)  # noqa: E731
        y = (ys[:, 0] + unflipped[:, 0] + untranspose(ys[:, 1]).contiguous().view(batch, -1, tokens)
             + untranspose(unflipped[:, 1]).contiguous().view(batch, -1, tokens))
        y = self.out_norm(y.transpose(dim0=1, dim1=2).contiguous()).view(batch, height, width, -1)
        return self.dropout(self.out_proj(y * gate))


def _checkpostfix(tag, value):
    found = value.endswith(tag)
    return found, (value[:-len(tag)] if found else value)


class SS2Dv2:
    def __initv2__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", act_layer=nn.SiLU, d_conv=3,
                   conv_bias=True, dropout=0.0, bias=False, forward_type="v2", channel_first=False, **kwargs):
        nn.Module.__init__(self)
        self.k_group, self.d_model, self.d_state = 4, int(d_model), int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank)
        self.channel_first = channel_first
        self.with_dconv = d_conv > 1
        Linear = Linear2d if channel_first else nn.Linear
        self.forward = self.forwardv2
        self.disable_force32, forward_type = _checkpostfix("_no32", forward_type)
        self.oact, forward_type = _checkpostfix("_oact", forward_type)
        self.disable_z, forward_type = _checkpostfix("_noz", forward_type)
        self.disable_z_act, forward_type = _checkpostfix("_nozact", forward_type)
        self.out_norm, forward_type = self.get_outnorm(forward_type, self.d_inner, channel_first)
        force_fp32 = not self.disable_force32
        cores = dict(
            v01=partial(self.forward_corev2, force_fp32=force_fp32, selective_scan_backend="mamba",
                        scan_force_torch=True),
            v02=partial(self.forward_corev2, force_fp32=force_fp32, selective_scan_backend="mamba"),
            v03=partial(self.forward_corev2, force_fp32=force_fp32, selective_scan_backend="oflex"),
            v04=partial(self.forward_corev2, force_fp32=False),
            v05=partial(self.forward_corev2, force_fp32=False, no_einsum=True),
            v2=partial(self.forward_corev2, force_fp32=force_fp32, selective_scan_backend="core"),
            v3=partial(self.forward_corev2, force_fp32=False, selective_scan_backend="oflex"),
        )
        if forward_type not in cores:
            raise NotImplementedError(f"forward_type {forward_type} is not reproduced")
        self.forward_core = cores[forward_type]
        self.in_proj = Linear(self.d_model, self.d_inner if self.disable_z else 2 * self.d_inner, bias=bias)
        self.act = act_layer()
        if self.with_dconv:
            self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                    groups=self.d_inner, bias=conv_bias)
        self.x_proj_weight = _x_proj_weight(self.k_group, self.d_inner, self.dt_rank + 2 * self.d_state)
        self.out_act = nn.GELU() if self.oact else nn.Identity()
        self.out_proj = Linear(self.d_inner, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.A_logs, self.Ds, self.dt_projs_weight, self.dt_projs_bias = mamba_init.init_dt_A_D(
            self.d_state, self.dt_rank, self.d_inner, k_group=self.k_group)

    def _x_proj(self, xs, batch, tokens, no_einsum):
        """dt (B, K, inner, L), B and C (B, K, N, L) of every direction, from its own weights."""
        groups, rank, n_state = self.k_group, self.dt_rank, self.d_state
        sizes = [rank, n_state, n_state]
        if not no_einsum:   # einsum over channels, direction k with weight k
            dts, Bs, Cs = torch.split(torch.einsum("b k d l, k c d -> b k c l", xs, self.x_proj_weight), sizes, dim=2)
            return torch.einsum("b k r l, k d r -> b k d l", dts, self.dt_projs_weight), Bs, Cs
        # the same products as grouped 1x1 conv1d (one group per direction)
        proj = F.conv1d(xs.view(batch, -1, tokens), self.x_proj_weight.view(-1, self.d_inner, 1), bias=None,
                        groups=groups)
        dts, Bs, Cs = torch.split(proj.view(batch, groups, -1, tokens), sizes, dim=2)
        dts = F.conv1d(dts.contiguous().view(batch, -1, tokens), self.dt_projs_weight.view(groups * self.d_inner, -1, 1),
                       groups=groups)
        return dts, Bs, Cs

    def forward_corev2(self, x, force_fp32=False, ssoflex=True, no_einsum=False, selective_scan_backend=None,
                       scan_force_torch=False, **kwargs):
        batch, _, height, width = x.shape
        groups, n_state, tokens = self.k_group, self.d_state, height * width
        xs = cross_scan_fn(x, in_channel_first=True, out_channel_first=True, scans=0, force_torch=scan_force_torch)
        dts, Bs, Cs = self._x_proj(xs, batch, tokens, no_einsum)
        us = xs.view(batch, -1, tokens)
        dts = dts.contiguous().view(batch, -1, tokens)
        Bs, Cs = (t.contiguous().view(batch, groups, n_state, tokens) for t in (Bs, Cs))
        As, Ds = -self.A_logs.to(torch.float).exp(), self.Ds.to(torch.float)
        bias = self.dt_projs_bias.view(-1).to(torch.float)
        if force_fp32:
            us, dts, Bs, Cs = (t.to(torch.float32) for t in (us, dts, Bs, Cs))
        ys = selective_scan_fn(us, dts, As, Bs, Cs, Ds, bias, True, ssoflex, backend=selective_scan_backend)
        merged = cross_merge_fn(ys.view(batch, groups, -1, height, width), in_channel_first=True,
                                out_channel_first=True, scans=0, force_torch=scan_force_torch)
        y = merged.view(batch, -1, height, width)
        if not self.channel_first:   # back to (B, H, W, inner) for nn.LayerNorm
            y = y.view(batch, -1, tokens).transpose(dim0=1, dim1=2).contiguous().view(batch, height, width, -1)
        return self.out_norm(y).to(x.dtype)

    def forwardv2(self, x, **kwargs):
        split = 1 if self.channel_first else -1
        x = self.in_proj(x)
        gate = None
        if not self.disable_z:
            x, gate = x.chunk(2, dim=split)
            gate = gate if self.disable_z_act else self.act(gate)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2).contiguous()
        x = self.act(self.conv2d(x) if self.with_dconv else x)
        y = self.out_act(self.forward_core(x))
        return self.dropout(self.out_proj(y if gate is None else y * gate))

    @staticmethod
    def get_outnorm(forward_type="", d_inner=192, channel_first=True):
        none, forward_type = _checkpostfix("_onnone", forward_type)
        norm = nn.Identity() if none else (LayerNorm2d if channel_first else nn.LayerNorm)(d_inner)
        return norm, forward_type


class SS2D(nn.Module, SS2Dv0, SS2Dv2):
    def __init__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", act_layer=nn.SiLU, d_conv=3,
                 conv_bias=True, dropout=0.0, bias=False, initialize="v0", forward_type="v2", channel_first=False,
                 **kwargs):
        kwargs.update(d_model=d_model, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, act_layer=act_layer,
                      d_conv=d_conv, conv_bias=conv_bias, dropout=dropout, bias=bias, forward_type=forward_type,
                      channel_first=channel_first)
        if forward_type in ("v0", "v0seq"):
            self.__initv0__(seq="seq" in forward_type, **kwargs)
        else:
            self.__initv2__(**kwargs)


class VSSBlock(nn.Module):
    def __init__(self, hidden_dim=0, drop_path=0.0, norm_layer=nn.LayerNorm, channel_first=False, ssm_d_state=16,
                 ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer=nn.SiLU, ssm_conv=3, ssm_conv_bias=True,
                 ssm_drop_rate=0.0, ssm_init="v0", forward_type="v2", mlp_ratio=4.0, mlp_act_layer=nn.GELU,
                 mlp_drop_rate=0.0, use_checkpoint=False, post_norm=False, **kwargs):
        super().__init__()
        self.ssm_branch, self.mlp_branch, self.post_norm = ssm_ratio > 0, mlp_ratio > 0, post_norm
        if self.ssm_branch:
            self.norm = norm_layer(hidden_dim)
            self.op = SS2D(d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                           act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias, dropout=ssm_drop_rate,
                           initialize=ssm_init, forward_type=forward_type, channel_first=channel_first)
        self.drop_path = DropPath(drop_path)
        if self.mlp_branch:
            self.norm2 = norm_layer(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), act_layer=mlp_act_layer, drop=mlp_drop_rate,
                           channels_first=channel_first)

    def forward(self, input):
        x = input
        if self.ssm_branch:
            x = x + self.drop_path(self.norm(self.op(x)) if self.post_norm else self.op(self.norm(x)))
        if self.mlp_branch:
            x = x + self.drop_path(self.norm2(self.mlp(x)) if self.post_norm else self.mlp(self.norm2(x)))
        return x


class VSSM(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 9, 2), dims=(96, 192, 384, 768),
                 ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3,
                 ssm_conv_bias=True, ssm_drop_rate=0.0, ssm_init="v0", forward_type="v2", mlp_ratio=4.0,
                 mlp_act_layer="gelu", mlp_drop_rate=0.0, gmlp=False, drop_path_rate=0.1, patch_norm=True,
                 norm_layer="LN", downsample_version="v2", patchembed_version="v1", use_checkpoint=False,
                 posembed=False, imgsize=224, **kwargs):
        super().__init__()
        self.channel_first = norm_layer.lower() in ("bn", "ln2d")
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [int(dims * 2 ** i) for i in range(self.num_layers)]
        self.num_features, self.dims = dims[-1], dims
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        norm = dict(ln=nn.LayerNorm, ln2d=LayerNorm2d, bn=nn.BatchNorm2d)[norm_layer.lower()]
        acts = dict(silu=nn.SiLU, gelu=nn.GELU, relu=nn.ReLU, sigmoid=nn.Sigmoid)
        ssm_act, mlp_act = acts[ssm_act_layer.lower()], acts[mlp_act_layer.lower()]
        self.pos_embed = None
        if posembed:
            grid = imgsize // patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], grid, grid))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        embed = dict(v1=self._make_patch_embed, v2=self._make_patch_embed_v2)[patchembed_version]
        self.patch_embed = embed(in_chans, dims[0], patch_size, patch_norm, norm, channel_first=self.channel_first)
        downsample = dict(v1=PatchMerging2D, v2=self._make_downsample, v3=self._make_downsample_v3)[downsample_version]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            down = (downsample(self.dims[i], self.dims[i + 1], norm_layer=norm, channel_first=self.channel_first)
                    if i < self.num_layers - 1 else nn.Identity())
            blocks = [VSSBlock(hidden_dim=self.dims[i], drop_path=dpr[sum(depths[:i]) + d], norm_layer=norm,
                               channel_first=self.channel_first, ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio,
                               ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act, ssm_conv=ssm_conv,
                               ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init,
                               forward_type=forward_type, mlp_ratio=mlp_ratio, mlp_act_layer=mlp_act,
                               mlp_drop_rate=mlp_drop_rate, use_checkpoint=use_checkpoint)
                      for d in range(depths[i])]
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks), downsample=down)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=norm(self.num_features),
            permute=(Permute(0, 3, 1, 2) if not self.channel_first else nn.Identity()),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            head=nn.Linear(self.num_features, num_classes),
        ))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @staticmethod
    def _make_patch_embed(in_chans=3, embed_dim=96, patch_size=4, patch_norm=True, norm_layer=nn.LayerNorm,
                          channel_first=False):
        return nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            (norm_layer(embed_dim) if patch_norm else nn.Identity()),
        )

    @staticmethod
    def _make_patch_embed_v2(in_chans=3, embed_dim=96, patch_size=4, patch_norm=True, norm_layer=nn.LayerNorm,
                             channel_first=False):
        stride = patch_size // 2
        kernel_size, padding = stride + 1, 1
        return nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=kernel_size, stride=stride, padding=padding),
            (nn.Identity() if (channel_first or not patch_norm) else Permute(0, 2, 3, 1)),
            (norm_layer(embed_dim // 2) if patch_norm else nn.Identity()),
            (nn.Identity() if (channel_first or not patch_norm) else Permute(0, 3, 1, 2)),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            (norm_layer(embed_dim) if patch_norm else nn.Identity()),
        )

    @staticmethod
    def _make_downsample(dim=96, out_dim=192, norm_layer=nn.LayerNorm, channel_first=False):
        return nn.Sequential(
            (nn.Identity() if channel_first else Permute(0, 3, 1, 2)),
            nn.Conv2d(dim, out_dim, kernel_size=2, stride=2),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            norm_layer(out_dim),
        )

    @staticmethod
    def _make_downsample_v3(dim=96, out_dim=192, norm_layer=nn.LayerNorm, channel_first=False):
        return nn.Sequential(
            (nn.Identity() if channel_first else Permute(0, 3, 1, 2)),
            nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            norm_layer(out_dim),
        )

    def forward(self, x):
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + (self.pos_embed if self.channel_first else self.pos_embed.permute(0, 2, 3, 1))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


def _config(depths, dims, drop_path_rate, ssm_d_state, ssm_ratio, ssm_conv_bias, forward_type, mlp_ratio,
            norm_layer, downsample_version, patchembed_version) -> dict:
    return dict(depths=depths, dims=dims, drop_path_rate=drop_path_rate, patch_size=4, in_chans=3,
                num_classes=1000, ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_dt_rank="auto",
                ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=0.0, ssm_init="v0",
                forward_type=forward_type, mlp_ratio=mlp_ratio, mlp_act_layer="gelu", mlp_drop_rate=0.0,
                gmlp=False, patch_norm=True, norm_layer=norm_layer, downsample_version=downsample_version,
                patchembed_version=patchembed_version, use_checkpoint=False, posembed=False, imgsize=224)


# the released configs (classification/models/vmamba.py); keyword overrides (tests: smaller dims) on top
def vanilla_vmamba_tiny(**overrides):
    return VSSM(**{**_config([2, 2, 9, 2], 96, 0.2, 16, 2.0, True, "v0", 0.0, "ln", "v1", "v1"), **overrides})


def vanilla_vmamba_small(**overrides):
    return VSSM(**{**_config([2, 2, 27, 2], 96, 0.3, 16, 2.0, True, "v0", 0.0, "ln", "v1", "v1"), **overrides})


def vanilla_vmamba_base(**overrides):
    return VSSM(**{**_config([2, 2, 27, 2], 128, 0.6, 16, 2.0, True, "v0", 0.0, "ln", "v1", "v1"), **overrides})


def vmamba_tiny_s1l8(channel_first=True, **overrides):
    norm = "ln2d" if channel_first else "ln"
    return VSSM(**{**_config([2, 2, 8, 2], 96, 0.2, 1, 1.0, False, "v05_noz", 4.0, norm, "v3", "v2"), **overrides})


def vmamba_small_s1l20(channel_first=True, **overrides):
    norm = "ln2d" if channel_first else "ln"
    return VSSM(**{**_config([2, 2, 20, 2], 96, 0.3, 1, 1.0, False, "v05_noz", 4.0, norm, "v3", "v2"), **overrides})


def vmamba_base_s1l20(channel_first=True, **overrides):
    norm = "ln2d" if channel_first else "ln"
    return VSSM(**{**_config([2, 2, 20, 2], 128, 0.5, 1, 1.0, False, "v05_noz", 4.0, norm, "v3", "v2"), **overrides})
