"""PlainMamba-L1/L2/L3 (ChenhongyiYang/PlainMamba, BMVC 2024) in plain PyTorch on
``mambaprune.runtime.selective_scan``.

Configuration from their ``arch_zoo`` (mmcls/plain_mamba_dev/models/plain_mamba/plain_mamba.py):
patch 16, embed 192/384/448, depth 24/24/36, d_state 16, expand 2, conv2d 7x7, in/out_proj with
bias, LayerNorm (eps 1e-5) pre-norm blocks, final LayerNorm (eps 1e-6), conv stem with 1/2/2 extra
3x3 convs, absolute position embedding, no class token, mean-pool readout, Linear head. L1 has
``layers_with_dwconv = [0]``: after block 0's residual add, the whole stream goes through a 3x3
depthwise conv (no bias) + BatchNorm + GELU on the H x W grid (no residual around it).

Mixer, as their `PlainMamba2D.forward` computes it: in_proj -> (x, z); x -> depthwise conv2d 7x7
on the grid -> SiLU; x_proj -> (dt, B, C), all three in raster (token) order; dt = dt_proj(dt)
(their code applies the full Linear, bias included, AND passes dt_proj.bias as delta_bias: the
bias counts twice, and so it does here). Four continuous zig-zag paths (row snake from the
top-left, its reverse, column snake from the top-left, its reverse) share ONE set of parameters
and make FOUR selective_scan calls. Each scan reads its input in path order, ``x[:, order]``, but
dt, B and C in raster order, so step t pairs the input of token order[t] with the dt/B/C of token
t; B gets a per-step direction offset: ``direction_Bs`` (5, N) indexed by the direction code of
step t of the path (0 start, 1 right, 2 left, 3 up, 4 down: the move that reached step t). The
output is put back with the inverse order ``y[:, inverse]``. Gate (not fused):
``y = (y_1 + y_2 + y_3 + y_4) * silu(z)``, then out_proj. Their checkpoints load with
``load_checkpoint`` (module names as theirs; their final norm `ln1` is our `norm1`) and give their
outputs.

Input size is fixed at construction (the zig-zag orders are built for that grid).
No pretrained weights exist offline.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune.runtime import selective_scan

from ._registry import register_model
from .layers import ConvStemPatchEmbed, dt_rank_for, init_dt_proj_, s4d_real_A_log, trunc_normal_

_MOVE_CODE = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}  # right, left, up, down


def _snake(H: int, W: int, by_rows: bool) -> List[Tuple[int, int]]:
    """Boustrophedon path from the top-left corner, row by row (or column by column)."""
    path = []
    outer, inner = (H, W) if by_rows else (W, H)
    for a in range(outer):
        span = range(inner) if a % 2 == 0 else range(inner - 1, -1, -1)
        path += [(a, b) if by_rows else (b, a) for b in span]
    return path


def zigzag_orders(H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four continuous 2D scan paths on an H x W grid (row-major token index i * W + j).

    Returns (orders, inverse, directions), each (4, H*W) int64: ``x[:, orders[k]]`` puts tokens in
    path order, ``y[:, inverse[k]]`` puts a path-ordered sequence back in token order, and
    ``directions[k][t]`` is the direction code of path step t (0 for the first token).
    """
    rows, cols = _snake(H, W, True), _snake(H, W, False)
    paths = [rows, rows[::-1], cols, cols[::-1]]
    orders, inverse, directions = [], [], []
    for path in paths:
        order = torch.tensor([i * W + j for i, j in path], dtype=torch.long)
        codes = [0] + [_MOVE_CODE[(i1 - i0, j1 - j0)] for (i0, j0), (i1, j1) in zip(path[:-1], path[1:])]
        orders.append(order)
        inverse.append(torch.argsort(order))
        directions.append(torch.tensor(codes, dtype=torch.long))
    return torch.stack(orders), torch.stack(inverse), torch.stack(directions)


class PlainMamba2D(nn.Module):
    """Mixer (B, L, D) -> (B, L, D) on a fixed H x W grid."""

    def __init__(self, d_model: int, grid_size: Tuple[int, int], d_state: int = 16, expand: int = 2, conv_size: int = 7):
        super().__init__()
        self.d_model, self.d_state, self.grid_size = d_model, d_state, tuple(grid_size)
        E = self.d_inner = expand * d_model
        R = self.dt_rank = dt_rank_for(d_model)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=True)
        self.conv2d = nn.Conv2d(E, E, conv_size, padding=conv_size // 2, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        init_dt_proj_(self.dt_proj, R)
        self.A_log = s4d_real_A_log(E, d_state)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=True)
        self.direction_Bs = nn.Parameter(trunc_normal_(torch.zeros(5, d_state)))
        orders, inverse, directions = zigzag_orders(*self.grid_size)
        self.register_buffer("orders", orders, persistent=False)
        self.register_buffer("inverse_orders", inverse, persistent=False)
        self.register_buffer("directions", directions, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, L, _ = x.shape
        H, W = self.grid_size
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        grid = xs.reshape(Bsz, H, W, self.d_inner).permute(0, 3, 1, 2)
        xs = F.silu(self.conv2d(grid)).permute(0, 2, 3, 1).reshape(Bsz, L, self.d_inner)
        dt, B, C = torch.split(self.x_proj(xs), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)  # (B, E, L) raster order; bias included, as in their code
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, N, L) raster order
        A = -torch.exp(self.A_log.float())
        y = None
        for k in range(4):
            steps = self.direction_Bs[self.directions[k]].t().to(B.dtype)  # (N, L): the offset of step t
            y_k = selective_scan(
                xs[:, self.orders[k]].transpose(1, 2), dt, A, B + steps, C, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )
            y_k = y_k.transpose(1, 2)[:, self.inverse_orders[k]]  # back to token order
            y = y_k if y is None else y + y_k
        return self.out_proj(y * F.silu(z))


class PlainMambaLayer(nn.Module):
    def __init__(self, dim: int, grid_size, d_state=16, expand=2, conv_size=7, with_dwconv=False):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.norm = nn.LayerNorm(dim)
        self.mamba = PlainMamba2D(dim, grid_size, d_state, expand, conv_size)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.GELU()
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mamba(self.norm(x))
        if self.with_dwconv:
            Bsz, L, C = x.shape
            H, W = self.grid_size
            x = self.dw(x.reshape(Bsz, H, W, C).permute(0, 3, 1, 2)).reshape(Bsz, C, L).transpose(1, 2)
        return x


class PlainMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=24,
                 d_state=16, expand=2, conv_size=7, num_convs_patch_embed=1, layers_with_dwconv=()):
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_embed = ConvStemPatchEmbed(img_size, patch_size, in_chans, embed_dim, num_convs_patch_embed)
        self.img_size = self.patch_embed.img_size
        self.num_prefix_tokens = 0
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, self.patch_embed.num_patches, embed_dim)))
        self.layers = nn.ModuleList(
            PlainMambaLayer(embed_dim, grid, d_state, expand, conv_size, with_dwconv=i in layers_with_dwconv)
            for i in range(depth)
        )
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def checkpoint_key_map(state: dict) -> dict:
        """Their mmcls classifier's keys -> ours: `backbone.` dropped, the final norm `ln1` is our
        `norm1`, the classifier `head.fc` our `head` (the average-pooling neck has no weights)."""
        mapped = {}
        for key, value in state.items():
            key = key[len("backbone."):] if key.startswith("backbone.") else key
            if key.startswith("ln1."):
                key = "norm1." + key[len("ln1."):]
            elif key.startswith("head.fc."):
                key = "head." + key[len("head.fc."):]
            mapped[key] = value
        return mapped

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.norm1(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


_ARCHS = {
    "plainmamba_l1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,)),
    "plainmamba_l2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, layers_with_dwconv=()),
    "plainmamba_l3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, layers_with_dwconv=()),
}


def _plainmamba(name: str, **overrides) -> PlainMamba:
    cfg = dict(img_size=224, patch_size=16, d_state=16, **_ARCHS[name])
    cfg.update(overrides)
    return PlainMamba(**cfg)


@register_model
def plainmamba_l1(**overrides) -> PlainMamba:
    return _plainmamba("plainmamba_l1", **overrides)


@register_model
def plainmamba_l2(**overrides) -> PlainMamba:
    return _plainmamba("plainmamba_l2", **overrides)


@register_model
def plainmamba_l3(**overrides) -> PlainMamba:
    return _plainmamba("plainmamba_l3", **overrides)
