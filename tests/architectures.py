"""A zoo of small vision state-space models, each written the way its own community writes them.

Not part of the library: these are "unfamiliar" models for the compiler (tests/test_architectures.py,
tests/test_properties.py). None of them uses mambaprune.models; all of them call
``mambaprune.selective_scan`` (the scan entry point a user would route their own kernel to).

Styles:
- ``LocalMambaStyle``: several scan directions per block (plain, flipped, transposed through the
  grid, windowed 2x2 by a constant permutation), each with its own parameters, summed after every
  direction is mapped back to token order.
- ``ClassTokenVim``: configurable ViM-like model: class token at the head / middle / none (mean
  pool) / head+tail (two class tokens read out and concatenated); 1-3 directions (forward, backward,
  a constant "even slots then odd slots" permutation).
- ``EinopsVim``: einops rearrange/repeat everywhere.
- ``WeightMatmulVim``: hustvl/Vim's ``in_proj.weight @ rearrange(x, "b l d -> d (b l)")``.
- ``Mamba2Style``: (B, L, H, P) layout, per-head scalar A expanded to (H*P, N) for the scan.
- ``MambaVisionStyle``: non-causal ("same") conv1d, concatenation of the SSM branch with a non-SSM
  branch instead of a gate, self-attention blocks in the same stage (``sdpa`` or an explicit
  ``q @ k.transpose(-2, -1)`` softmax); ``windowed=True`` runs the mixers inside window_partition /
  window_reverse on a (B, C, H, W) map.
- ``VMambaStyle``: hierarchical channels-first model, two stages with a strided conv downsampling,
  LayerNorm2d, a 4-way cross-scan folded into ONE scan call with grouped B/C (B, 4, N, L).
  ``variant`` builds malformed relatives the compiler must refuse: "interleaved" (the scan's channels
  interleave the directions, so they do not match B/C's groups), "unmerged" (the column-major
  output is added without being transposed back), "groups_mismatched" (B/C list the directions in
  another order than u).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from mambaprune import selective_scan


# ------------------------------------------------------------------------------------------------
# small helpers every Mamba code base has a copy of
# ------------------------------------------------------------------------------------------------
def a_log_init(channels: int, d_state: int) -> nn.Parameter:
    return nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1)))


def dt_proj_init(rank: int, channels: int) -> nn.Linear:
    proj = nn.Linear(rank, channels, bias=True)
    with torch.no_grad():
        nn.init.uniform_(proj.weight, -rank ** -0.5, rank ** -0.5)
        dt = torch.exp(torch.rand(channels) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return proj


def grid_of(img_size: int, patch_size: int) -> int:
    assert img_size % patch_size == 0
    return img_size // patch_size


# ------------------------------------------------------------------------------------------------
# 1. LocalMamba-style: per-direction parameters, directions through the grid and windows
# ------------------------------------------------------------------------------------------------
def window_order(h: int, w: int, win: int) -> torch.Tensor:
    """Token order that visits the grid window by window (win x win), row-major inside a window."""
    order = []
    for wi in range(0, h, win):
        for wj in range(0, w, win):
            for i in range(wi, wi + win):
                for j in range(wj, wj + win):
                    order.append(i * w + j)
    return torch.tensor(order, dtype=torch.long)


class LocalScanDirection(nn.Module):
    """One direction of a LocalMamba mixer with its own conv1d / x_proj / dt_proj / A_log / D."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int = 4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = dt_proj_init(dt_rank, d_inner)
        self.A_log = a_log_init(d_inner, d_state)
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, E) in this direction's order -> y (B, L, E) in the same order."""
        L = x.shape[1]
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L])          # (B, E, L)
        dbl = self.x_proj(x.transpose(1, 2))
        dt, B, C = dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan(x, delta, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D,
                           delta_bias=self.dt_proj.bias, delta_softplus=True)
        return y.transpose(1, 2)


class LocalMambaMixer(nn.Module):
    DIRECTIONS = ("h", "h_flip", "v", "w2")

    def __init__(self, dim: int, grid: int, d_state: int, directions=DIRECTIONS, expand: int = 2, combine="add"):
        super().__init__()
        self.grid, self.directions, self.combine = grid, tuple(directions), combine
        self.d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.scans = nn.ModuleDict({d: LocalScanDirection(self.d_inner, d_state, math.ceil(dim / 16))
                                    for d in self.directions})
        for d in self.directions:
            if d.startswith("w"):     # "w2", "w7": window by window (2 x 2, 7 x 7), row-major inside
                order = window_order(grid, grid, int(d[1:]))
                self.register_buffer(f"{d}_order", order, persistent=False)
                self.register_buffer(f"{d}_inverse", torch.argsort(order), persistent=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def to_direction(self, x, d):
        if d == "h":
            return x
        if d == "h_flip":
            return x.flip(1)
        if d == "v":      # column-major: grid, swap H and W, flatten
            B, L, E = x.shape
            return x.reshape(B, self.grid, self.grid, E).transpose(1, 2).flatten(1, 2)
        if d.startswith("w"):
            return x[:, getattr(self, f"{d}_order")]
        if d.startswith("vw"):   # the same window-by-window order written as a view of the grid and a permute
            B, L, E = x.shape
            H = W = self.grid
            w = int(d[2:])
            return x.view(B, H // w, w, W // w, w, E).permute(0, 1, 3, 2, 4, 5).reshape(B, L, E)
        raise ValueError(d)

    def from_direction(self, y, d):
        if d == "h":
            return y
        if d == "h_flip":
            return y.flip(1)
        if d == "v":
            B, L, E = y.shape
            return y.reshape(B, self.grid, self.grid, E).transpose(1, 2).flatten(1, 2)
        if d.startswith("w"):
            return y[:, getattr(self, f"{d}_inverse")]
        if d.startswith("vw"):
            B, L, E = y.shape
            H = W = self.grid
            w = int(d[2:])
            return y.view(B, H // w, W // w, w, w, E).permute(0, 1, 3, 2, 4, 5).reshape(B, L, E)
        raise ValueError(d)

    def forward(self, x):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        if self.combine == "add":
            y = 0
            for d in self.directions:
                y = y + self.from_direction(self.scans[d](self.to_direction(xs, d)), d)
            return self.out_proj(y * F.silu(z))
        ys = [self.from_direction(self.scans[d](self.to_direction(xs, d)), d) for d in self.directions]
        if self.combine == "stack_sum":        # torch.stack(...).sum(0)
            y = torch.stack(ys).sum(0)
        else:                                  # "cat_tokens": side by side on the token axis, a direction axis
            B, L, E = ys[0].shape
            y = torch.cat(ys, dim=1).reshape(B, len(ys), L, E).sum(1)
        return self.out_proj(y * F.silu(z))


class LocalMambaStyle(nn.Module):
    """Plain (isotropic) LocalVim-like model, no class token, mean pool."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10,
                 directions=LocalMambaMixer.DIRECTIONS, combine="add"):
        super().__init__()
        self.img_size = img_size
        g = grid_of(img_size, patch_size)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g, embed_dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(depth))
        self.mixers = nn.ModuleList(LocalMambaMixer(embed_dim, g, d_state, directions, combine=combine)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.head(self.norm(x).mean(1))


# ------------------------------------------------------------------------------------------------
# 2. class-token placements, 1-3 directions (also the property-test family)
# ------------------------------------------------------------------------------------------------
def even_odd_order(length: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, length, 2), torch.arange(1, length, 2)])


class DirectionalMixer(nn.Module):
    """ViM-like mixer with a separate residual stream; every direction has its own parameters."""

    def __init__(self, dim, d_state, length, directions=("fwd", "bwd"), expand=2, d_conv=4):
        super().__init__()
        E, R = expand * dim, math.ceil(dim / 16)
        self.E, self.R, self.N, self.directions = E, R, d_state, tuple(directions)
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv = nn.ModuleList(nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1) for _ in directions)
        self.x_proj = nn.ModuleList(nn.Linear(E, R + 2 * d_state, bias=False) for _ in directions)
        self.dt_proj = nn.ModuleList(dt_proj_init(R, E) for _ in directions)
        self.A_log = nn.ParameterList(a_log_init(E, d_state) for _ in directions)
        self.D = nn.ParameterList(nn.Parameter(torch.ones(E)) for _ in directions)
        order = even_odd_order(length)
        self.register_buffer("perm", order, persistent=False)
        self.register_buffer("perm_inverse", torch.argsort(order), persistent=False)
        self.out_proj = nn.Linear(E, dim, bias=False)

    def scan(self, i, x, z):
        L = x.shape[-1]
        x = F.silu(self.conv[i](x)[..., :L])
        dt, B, C = self.x_proj[i](x.transpose(1, 2)).split([self.R, self.N, self.N], dim=-1)
        delta = F.linear(dt, self.dt_proj[i].weight).transpose(1, 2)
        return selective_scan(x, delta, -torch.exp(self.A_log[i].float()), B.transpose(1, 2), C.transpose(1, 2),
                              self.D[i].float(), z=z, delta_bias=self.dt_proj[i].bias.float(), delta_softplus=True)

    def forward(self, h):
        xz = self.in_proj(h).transpose(1, 2)          # (B, 2E, L)
        out = 0
        for i, d in enumerate(self.directions):
            if d == "fwd":
                x, z = xz.chunk(2, dim=1)
                out = out + self.scan(i, x, z)
            elif d == "bwd":
                x, z = xz.flip(-1).chunk(2, dim=1)
                out = out + self.scan(i, x, z).flip(-1)
            elif d == "perm":
                x, z = xz[:, :, self.perm].chunk(2, dim=1)
                out = out + self.scan(i, x, z)[:, :, self.perm_inverse]
            else:
                raise ValueError(d)
        return self.out_proj((out / len(self.directions)).transpose(1, 2))


class SlicedClassTokenVim(nn.Module):
    """A class token in the middle of the stream that bypasses every mixer: sliced out before it
    (`x[:, :M]`, `x[:, M + 1:]`) and concatenated back into the middle after it; read out beside
    the mean of the tokens."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10):
        super().__init__()
        self.img_size = img_size
        g = grid_of(img_size, patch_size)
        self.middle = g * g // 2
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g + 1, embed_dim) * 0.02)
        self.layers = nn.ModuleList(DirectionalMixer(embed_dim, d_state, g * g) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(depth))
        self.norm_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        M = self.middle
        x = torch.cat([x[:, :M], self.cls_token.expand(x.shape[0], -1, -1), x[:, M:]], dim=1) + self.pos_embed
        for norm, mixer in zip(self.norms, self.layers):
            tokens = torch.cat([x[:, :M], x[:, M + 1:]], dim=1)
            tokens = tokens + mixer(norm(tokens))
            x = torch.cat([tokens[:, :M], x[:, M:M + 1], tokens[:, M:]], dim=1)
        pooled = torch.cat([x[:, :M], x[:, M + 1:]], dim=1).mean(1)
        return self.head(self.norm_f(x[:, M] + pooled))


class ClassTokenVim(nn.Module):
    """cls in ("head", "middle", "none", "head+tail"); directions a subset of ("fwd", "bwd", "perm")."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10,
                 cls="head", directions=("fwd", "bwd")):
        super().__init__()
        self.img_size, self.cls = img_size, cls
        g = grid_of(img_size, patch_size)
        self.num_patches = g * g
        n_cls = {"head": 1, "middle": 1, "none": 0, "head+tail": 2}[cls]
        length = self.num_patches + n_cls
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        if n_cls:
            self.cls_token = nn.Parameter(torch.randn(1, n_cls, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, length, embed_dim) * 0.02)
        self.layers = nn.ModuleList(DirectionalMixer(embed_dim, d_state, length, directions) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(depth))
        self.norm_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim * (2 if cls == "head+tail" else 1), num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        b = x.shape[0]
        if self.cls == "head":
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        elif self.cls == "middle":
            m = self.num_patches // 2
            x = torch.cat([x[:, :m], self.cls_token.expand(b, -1, -1), x[:, m:]], dim=1)
        elif self.cls == "head+tail":
            cls = self.cls_token.expand(b, -1, -1)
            x = torch.cat([cls[:, :1], x, cls[:, 1:]], dim=1)
        hidden, residual = x + self.pos_embed, None
        for norm, mixer in zip(self.norms, self.layers):
            residual = hidden if residual is None else residual + hidden
            hidden = mixer(norm(residual))
        h = self.norm_f(residual + hidden)
        if self.cls == "head":
            feat = h[:, 0]
        elif self.cls == "middle":
            feat = h[:, self.num_patches // 2]
        elif self.cls == "head+tail":
            feat = torch.cat([h[:, 0], h[:, -1]], dim=-1)
        else:
            feat = h.mean(dim=1)
        return self.head(feat)


# ------------------------------------------------------------------------------------------------
# 3a. einops everywhere
# ------------------------------------------------------------------------------------------------
class EinopsMixer(nn.Module):
    def __init__(self, dim, d_state, expand=2, d_conv=4):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand * dim, d_state, math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = dt_proj_init(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.log(repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n",
                                                   d=self.d_inner)))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim)

    def forward(self, x):
        L = x.shape[1]
        xz = rearrange(self.in_proj(x), "b l d -> b d l")
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])
        dbl = self.x_proj(rearrange(x, "b d l -> b l d"))
        dt, B, C = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = rearrange(self.dt_proj(dt), "b l d -> b d l")
        y = selective_scan(x, delta, -torch.exp(self.A_log), rearrange(B, "b l n -> b n l"),
                           rearrange(C, "b l n -> b n l"), self.D, z=z, delta_softplus=True)
        return self.out_proj(rearrange(y, "b d l -> b l d"))


class EinopsVim(nn.Module):
    """Patchify by rearrange, class token at the head by repeat, unidirectional scans, reduce-mean readout.

    (With a unidirectional scan a head class token sees nothing but itself: the readout pools.)"""

    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10):
        super().__init__()
        self.img_size, self.p = img_size, patch_size
        g = grid_of(img_size, patch_size)
        self.to_embed = nn.Linear(3 * patch_size * patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(embed_dim), mixer=EinopsMixer(embed_dim, d_state)))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.p, p2=self.p)
        x = self.to_embed(x)
        cls = repeat(self.cls_token, "1 n d -> b n d", b=x.shape[0])
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = x + blk["mixer"](blk["norm"](x))
        return self.head(reduce(self.norm(x), "b l d -> b d", "mean"))


# ------------------------------------------------------------------------------------------------
# 3b. hustvl/Vim: in_proj.weight @ rearrange(x, "b l d -> d (b l)")
# ------------------------------------------------------------------------------------------------
class WeightMatmulMixer(nn.Module):
    def __init__(self, dim, d_state, expand=2, d_conv=4):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand * dim, d_state, math.ceil(dim / 16)
        E = self.d_inner
        self.in_proj = nn.Linear(dim, 2 * E, bias=True)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.x_proj_b = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = dt_proj_init(self.dt_rank, E)
        self.dt_proj_b = dt_proj_init(self.dt_rank, E)
        self.A_log = a_log_init(E, d_state)
        self.A_b_log = a_log_init(E, d_state)
        self.D = nn.Parameter(torch.ones(E))
        self.D_b = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, dim, bias=False)

    def _ssm(self, xz, conv1d, x_proj, dt_proj, A_log, D, seqlen):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv1d(x)[..., :seqlen])
        x_dbl = x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt_proj.weight @ dt.t()
        dt = rearrange(dt, "d (b l) -> b d l", l=seqlen)
        B = rearrange(B, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
        C = rearrange(C, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
        return selective_scan(x, dt, -torch.exp(A_log.float()), B, C, D.float(), z=z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden_states):
        batch, seqlen, dim = hidden_states.shape
        xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l",
                       l=seqlen)
        xz = xz + rearrange(self.in_proj.bias.to(dtype=xz.dtype), "d -> d 1")
        out = self._ssm(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, seqlen)
        out_b = self._ssm(xz.flip([-1]), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, seqlen)
        return F.linear(rearrange(out + out_b.flip([-1]), "b d l -> b l d"), self.out_proj.weight)


class WeightMatmulVim(nn.Module):
    """Vim's separate residual stream, middle class token, RMS-free LayerNorm for brevity."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10):
        super().__init__()
        self.img_size = img_size
        g = grid_of(img_size, patch_size)
        self.token_position = g * g // 2
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g + 1, embed_dim) * 0.02)
        self.layers = nn.ModuleList(WeightMatmulMixer(embed_dim, d_state) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(depth))
        self.norm_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = rearrange(self.patch_embed(img), "b d h w -> b (h w) d")
        M = self.token_position
        x = torch.cat((x[:, :M, :], self.cls_token.expand(x.shape[0], -1, -1), x[:, M:, :]), dim=1)
        hidden, residual = x + self.pos_embed, None
        for norm, mixer in zip(self.norms, self.layers):
            residual = (residual + hidden) if residual is not None else hidden
            hidden = mixer(norm(residual))
        return self.head(self.norm_f(residual + hidden)[:, M, :])


# ------------------------------------------------------------------------------------------------
# 3c. mamba2-style layout (B, L, H, P), per-head scalar A
# ------------------------------------------------------------------------------------------------
class Mamba2StyleMixer(nn.Module):
    """Mamba2's layout on the Mamba-1 scan, as mamba_ssm's ``ssd_selective_scan`` reference does it:
    x (B, L, H, P), dt (B, L, H), B/C (B, L, G, N), scalar A per head repeated to (H*P, N)."""

    def __init__(self, dim, d_state, headdim=8, expand=2, d_conv=4, ngroups=1):
        super().__init__()
        self.d_inner = expand * dim
        self.headdim, self.nheads, self.d_state, self.ngroups = headdim, self.d_inner // headdim, d_state, ngroups
        H, N, G = self.nheads, d_state, ngroups
        self.conv_dim = self.d_inner + 2 * G * N
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + H, bias=False)   # z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.rand(H) * 0.1 - 2.0)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))   # one scalar per head
        self.D = nn.Parameter(torch.ones(H))
        self.norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, u):
        batch, seqlen, _ = u.shape
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, H], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :seqlen].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", h=H)
        B = rearrange(B, "b l (g n) -> b l g n", g=G)
        C = rearrange(C, "b l (g n) -> b l g n", g=G)
        # --- ssd_selective_scan ---
        x = rearrange(x, "b l h p -> b (h p) l")
        dt = repeat(dt, "b l h -> b l h p", p=P)
        dt = rearrange(dt, "b l h p -> b (h p) l")
        A = repeat(-torch.exp(self.A_log.float()), "h -> (h p) n", p=P, n=N)
        B = rearrange(B, "b l g n -> b g n l")
        C = rearrange(C, "b l g n -> b g n l")
        D = repeat(self.D.float(), "h -> (h p)", p=P)
        dt_bias = rearrange(repeat(self.dt_bias.float(), "h -> h p", p=P), "h p -> (h p)")
        y = selective_scan(x, dt, A, B, C, D=D, delta_bias=dt_bias, delta_softplus=True)
        y = rearrange(y, "b (h p) l -> b l h p", p=P)
        # --- back to the block ---
        y = rearrange(y, "b l h p -> b l (h p)")
        return self.out_proj(self.norm(y) * F.silu(z))


class Mamba2Style(nn.Module):
    def __init__(self, img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=10):
        super().__init__()
        self.img_size = img_size
        g = grid_of(img_size, patch_size)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, g * g, embed_dim) * 0.02)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(embed_dim), Mamba2StyleMixer(embed_dim, d_state))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(x).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# 4. MambaVision-style
# ------------------------------------------------------------------------------------------------
class MambaVisionMixer(nn.Module):
    """As NVlabs/MambaVision: x and z halves, 'same' conv1d on both, scan without gate, concat."""

    def __init__(self, d_model, d_state=4, d_conv=3, expand=1, conv_padding="same"):
        super().__init__()
        self.d_inner = int(expand * d_model)
        self.dt_rank, self.d_state = math.ceil(d_model / 16), d_state
        self.conv_padding = conv_padding
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = dt_proj_init(self.dt_rank, half)
        self.A_log = a_log_init(half, d_state)
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False)

    def forward(self, hidden_states):
        _, seqlen, _ = hidden_states.shape
        xz = rearrange(self.in_proj(hidden_states), "b l d -> b d l")
        x, z = xz.chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())
        x = F.silu(F.conv1d(x, self.conv1d_x.weight, self.conv1d_x.bias, padding=self.conv_padding,
                            groups=self.d_inner // 2))
        z = F.silu(F.conv1d(z, self.conv1d_z.weight, self.conv1d_z.bias, padding=self.conv_padding,
                            groups=self.d_inner // 2))
        x_dbl = self.x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(self.dt_proj(dt), "(b l) d -> b d l", l=seqlen)
        B = rearrange(B, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
        C = rearrange(C, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
        y = selective_scan(x, dt, A, B, C, self.D.float(), z=None, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True)
        y = torch.cat([y, z], dim=1)
        return self.out_proj(rearrange(y, "b d l -> b l d"))


class Attention(nn.Module):
    """timm's Attention; explicit=True spells out softmax(q k^T) v instead of sdpa."""

    def __init__(self, dim, num_heads=2, explicit=False):
        super().__init__()
        self.num_heads, self.head_dim, self.explicit = num_heads, dim // num_heads, explicit
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.explicit:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MambaVisionBlock(nn.Module):
    def __init__(self, dim, d_state, attention=None, conv_padding="same"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention is None:
            self.mixer = MambaVisionMixer(dim, d_state, conv_padding=conv_padding)
        else:
            self.mixer = Attention(dim, explicit=attention == "explicit")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def window_partition(x, window_size):
    """(B, C, H, W) -> (B * num_windows, window_size**2, C), as MambaVision."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // window_size, window_size, W // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, C)


def window_reverse(windows, window_size, H, W):
    """(B * num_windows, window_size**2, C) -> (B, C, H, W). MambaVision's own line is kept in
    ``window_reverse_int`` (``int(...)`` of the batch size: torch.export specialises the batch)."""
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.reshape(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, windows.shape[2], H, W)


def window_reverse_int(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.reshape(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, windows.shape[2], H, W)


def window_reverse_floor(windows, window_size, H, W):
    """As ``window_reverse_int`` with math.floor: a batch made constant in a way capture does not route."""
    B = math.floor(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.reshape(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, windows.shape[2], H, W)


class MambaVisionStyle(nn.Module):
    """One hybrid stage: the first half of the blocks are Mamba mixers, the second half attention.

    attention: "sdpa" or "explicit"; windowed: run the stage on window_partition'ed (B, C, H, W).
    conv_padding: MambaVision's own "same", or the equivalent integer (d_conv - 1) // 2.
    """

    def __init__(self, img_size=32, patch_size=8, embed_dim=48, depth=4, d_state=4, num_classes=10,
                 attention="sdpa", windowed=False, window_size=4, conv_padding="same", reverse=window_reverse):
        super().__init__()
        self.img_size, self.windowed, self.window_size = img_size, windowed, window_size
        self.reverse = reverse
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.grid = grid_of(img_size, patch_size)
        if not windowed:
            self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2, embed_dim) * 0.02)
        attn_blocks = range(depth // 2, depth)
        self.blocks = nn.ModuleList(
            MambaVisionBlock(embed_dim, d_state, attention if i in attn_blocks else None, conv_padding)
            for i in range(depth))
        self.norm = nn.BatchNorm2d(embed_dim) if windowed else nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img)                           # (B, C, H, W)
        if self.windowed:
            _, _, H, W = x.shape
            x = window_partition(x, self.window_size)
            for blk in self.blocks:
                x = blk(x)
            x = self.reverse(x, self.window_size, H, W)
            return self.head(torch.flatten(F.adaptive_avg_pool2d(self.norm(x), 1), 1))
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


# ------------------------------------------------------------------------------------------------
# 5. VMamba-style: hierarchical, channels-first, 4-way cross-scan in ONE grouped scan
# ------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


def cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, L): row-major, column-major, and both reversed."""
    B, C, H, W = x.shape
    x_hwwh = torch.stack([x.flatten(2, 3), torch.transpose(x, dim0=2, dim1=3).contiguous().flatten(2, 3)], dim=1)
    return torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)


def cross_merge(ys, H, W):
    """(B, 4, C, L) -> (B, C, L) in row-major token order."""
    B, K, C, L = ys.shape
    ys = ys[:, 0:2] + ys[:, 2:4].flip(dims=[-1])
    return ys[:, 0] + ys[:, 1].view(B, C, W, H).transpose(dim0=2, dim1=3).contiguous().view(B, C, L)


class SS2D(nn.Module):
    VARIANTS = ("vmamba", "interleaved", "unmerged", "groups_mismatched")

    def __init__(self, d_model, d_state=4, expand=2, d_conv=3, K=4, variant="vmamba"):
        super().__init__()
        assert variant in self.VARIANTS
        self.variant = variant
        self.d_inner, self.d_state, self.dt_rank, self.K = expand * d_model, d_state, math.ceil(d_model / 16), K
        D, R, N = self.d_inner, self.dt_rank, d_state
        self.in_proj = Linear2d(d_model, 2 * D, bias=False)
        self.conv2d = nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=True)
        self.x_proj_weight = nn.Parameter(torch.randn(K, R + 2 * N, D) * D ** -0.5)
        self.dt_projs_weight = nn.Parameter(torch.stack([dt_proj_init(R, D).weight.detach() for _ in range(K)]))
        self.dt_projs_bias = nn.Parameter(torch.stack([dt_proj_init(R, D).bias.detach() for _ in range(K)]))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * D, 1))
        self.Ds = nn.Parameter(torch.ones(K * D))
        self.out_norm = LayerNorm2d(D)
        self.out_proj = Linear2d(D, d_model, bias=False)

    def forward(self, x):
        x, z = self.in_proj(x).chunk(2, dim=1)               # (B, D, H, W)
        x = F.silu(self.conv2d(x))
        B, D, H, W = x.shape
        L, K, N, R = H * W, self.K, self.d_state, self.dt_rank
        xs = cross_scan(x)                                    # (B, K, D, L)
        x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts, self.dt_projs_weight)
        if self.variant == "interleaved":      # channel c * K + k is direction k: not B/C's group k
            xs, dts = xs.transpose(1, 2), dts.transpose(1, 2)
        if self.variant == "groups_mismatched":
            Bs, Cs = Bs.flip(1), Cs.flip(1)
        ys = selective_scan(xs.reshape(B, -1, L), dts.reshape(B, -1, L), -torch.exp(self.A_logs.float()),
                            Bs.contiguous(), Cs.contiguous(), self.Ds.float(),
                            delta_bias=self.dt_projs_bias.reshape(-1).float(), delta_softplus=True)
        if self.variant == "unmerged":
            ys = ys.view(B, K, D, L)
            y = (ys[:, 0] + ys[:, 2].flip(-1) + ys[:, 1] + ys[:, 3].flip(-1)).view(B, D, H, W)
        else:
            y = cross_merge(ys.view(B, K, D, L), H, W).view(B, D, H, W)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    def __init__(self, dim, d_state, variant="vmamba"):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, d_state, variant=variant)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = nn.Sequential(Linear2d(dim, 2 * dim), nn.GELU(), Linear2d(2 * dim, dim))

    def forward(self, x):
        x = x + self.op(self.norm(x))
        return x + self.mlp(self.norm2(x))


class VMambaStyle(nn.Module):
    """Stem (patch 4) -> stage 1 (dims[0]) -> strided conv downsample -> stage 2 (dims[1]) -> pool."""

    def __init__(self, img_size=32, patch_size=4, dims=(24, 48), depths=(2, 2), d_state=4, num_classes=10,
                 variant="vmamba"):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = nn.Sequential(nn.Conv2d(3, dims[0], patch_size, stride=patch_size), LayerNorm2d(dims[0]))
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = [VSSBlock(dim, d_state, variant) for _ in range(depth)]
            down = (nn.Sequential(nn.Conv2d(dim, dims[i + 1], 2, stride=2), LayerNorm2d(dims[i + 1]))
                    if i + 1 < len(dims) else nn.Identity())
            self.stages.append(nn.ModuleDict(dict(blocks=nn.Sequential(*blocks), downsample=down)))
        self.norm = LayerNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, img):
        x = self.patch_embed(img)
        for stage in self.stages:
            x = stage["downsample"](stage["blocks"](x))
        return self.head(self.norm(x).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------
# 5b. hierarchical ViM: two token stages (64 then 16 tokens), strided conv between them
# ------------------------------------------------------------------------------------------------
class HierarchicalVim(nn.Module):
    """(B, L, C) token stages with ViM-like bidirectional mixers; between the stages the tokens go back
    to the (B, C, H, W) grid, through a 2x2/2 conv, and are flattened again. Mean pool."""

    def __init__(self, img_size=32, dims=(24, 48), depths=(2, 2), d_state=4, num_classes=10):
        super().__init__()
        self.img_size = img_size
        self.stem = nn.Conv2d(3, dims[0], 4, stride=4)
        self.grids = (img_size // 4, img_size // 8)
        self.stage1 = nn.ModuleList(DirectionalMixer(dims[0], d_state, self.grids[0] ** 2) for _ in range(depths[0]))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dims[0]) for _ in range(depths[0]))
        self.down = nn.Conv2d(dims[0], dims[1], 2, stride=2)
        self.stage2 = nn.ModuleList(DirectionalMixer(dims[1], d_state, self.grids[1] ** 2) for _ in range(depths[1]))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dims[1]) for _ in range(depths[1]))
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)
        for norm, mixer in zip(self.norm1, self.stage1):
            x = x + mixer(norm(x))
        B, L, C = x.shape
        g = self.grids[0]
        x = self.down(x.transpose(1, 2).reshape(B, C, g, g)).flatten(2).transpose(1, 2)
        for norm, mixer in zip(self.norm2, self.stage2):
            x = x + mixer(norm(x))
        return self.head(x.mean(1))


ZOO = {
    "localmamba": lambda: LocalMambaStyle(depth=3),
    "localmamba_7x7": lambda: LocalMambaStyle(img_size=56, patch_size=4, embed_dim=16, depth=3,
                                              directions=("h", "h_flip", "v", "w2", "w7")),
    "localmamba_view_windows": lambda: LocalMambaStyle(depth=3, directions=("h", "vw2")),
    "localmamba_stack_sum": lambda: LocalMambaStyle(depth=3, directions=("h", "h_flip", "v"), combine="stack_sum"),
    "localmamba_cat_tokens": lambda: LocalMambaStyle(depth=3, directions=("h", "h_flip", "vw2"),
                                                     combine="cat_tokens"),
    "cls_sliced_middle": lambda: SlicedClassTokenVim(depth=3),
    "cls_head": lambda: ClassTokenVim(cls="head", depth=3),
    "cls_none_meanpool": lambda: ClassTokenVim(cls="none", depth=3),
    "cls_head_tail": lambda: ClassTokenVim(cls="head+tail", depth=3),
    "einops": lambda: EinopsVim(depth=3),
    "weight_matmul_vim": lambda: WeightMatmulVim(depth=3),
    "mamba2_layout": lambda: Mamba2Style(depth=3),
    "mambavision": lambda: MambaVisionStyle(attention="sdpa"),                          # padding="same"
    "mambavision_int_padding": lambda: MambaVisionStyle(attention="sdpa", conv_padding=1),
    "mambavision_explicit_attn": lambda: MambaVisionStyle(attention="explicit", conv_padding=1),
    "mambavision_windowed": lambda: MambaVisionStyle(windowed=True, patch_size=4, conv_padding=1),
    "mambavision_windowed_int_reverse": lambda: MambaVisionStyle(windowed=True, patch_size=4, conv_padding=1,
                                                                 reverse=window_reverse_int),
    "vmamba": lambda: VMambaStyle(),
    "vmamba_4_stages": lambda: VMambaStyle(img_size=64, dims=(16, 24, 32, 48), depths=(2, 2, 4, 2)),
    "vmamba_interleaved": lambda: VMambaStyle(variant="interleaved"),
    "vmamba_unmerged": lambda: VMambaStyle(variant="unmerged"),
    "vmamba_groups_mismatched": lambda: VMambaStyle(variant="groups_mismatched"),
    "hierarchical_vim": lambda: HierarchicalVim(depths=(3, 3)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name]().eval()
