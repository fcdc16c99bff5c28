"""Alignment modes against their DEFINITIONS (DESIGN.md, "Selective scan and the position map").

Each test forces a hand-chosen keep set at ONE site (a constant-score `metric` callable) and
compares the pruned model's output with a direct computation written here in plain torch: the
model's own modules run the dense blocks before the site, then every later block is recomputed
token by token on the kept tokens from the modules' parameters, with a sequential selective scan,
explicit scatter-to-zero-sequence / zero-grid convolutions and explicit restricted scan paths.
Nothing in the reference uses mambaprune's compiler or runtime code.

Definitions (per sample, P = sorted original positions of the K kept tokens):
- hold:  kept tokens keep their ORIGINAL positions for token mixing: conv windows read original
         neighbours (pruned ones count as zero), every scan runs along the original path restricted
         to the kept tokens (state passes unchanged across pruned tokens). A scan whose operands
         come in different orders (PlainMamba: u along the zig-zag path, dt / B / C in raster order)
         reads each operand's kept tokens in that operand's own order, step by step; a constant
         per-position table (PlainMamba's direction offset on B, indexed like B) is read at each
         kept token's original position.
- decay: as hold, but a kept token's state transition is exp(g * delta * A) with g the number of
         path steps since the previous kept token on that path (input term uses delta as is).
- none:  ViT-style: the kept tokens form a contiguous sequence at positions 0..K-1 (sorted order);
         conv1d / flip / zig-zag / conv2d are rebuilt on that compacted sequence (compacted token j
         sits at grid cell j; each zig-zag path is the original path restricted to cells < K; the
         direction offset is read at the compacted token's cell j).
Decay gaps are counted along the order of the scan's output (u's path for PlainMamba).

Site semantics tested: a site {k: rate} prunes between block k-1 and block k; blocks 0..k-1 are
dense (their token mixers, including PlainMamba-L1's dwconv after block 0, see every token).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambaprune
from mambaprune.models import create_model

TOL = 1e-4

# ------------------------------------------------------------------------------------ keep sets

# ViM tiny: 4x4 patches + middle class token at index 8 -> L = 17. keep 0.5 -> K = 1 + 8 = 9.
VIM_KEEP = [
    [0, 1, 4, 8, 9, 12, 13, 15, 16],   # gaps of 1, 3, 4 (> d_conv - 1), cls kept
    [2, 3, 5, 6, 7, 8, 10, 11, 14],    # another set: per-sample selection
]
VIM_KEEP_OTHER = [
    [0, 2, 3, 6, 8, 9, 10, 14, 15],
    [1, 4, 5, 8, 9, 12, 13, 15, 16],
]
# PlainMamba tiny: 64 px, patch 16 -> 4x4 grid, L = 16, no class token. keep 0.5 -> K = 8.
PM_KEEP = [
    [0, 2, 3, 5, 9, 10, 12, 15],
    [1, 4, 6, 7, 8, 11, 13, 14],
]


def keep_metric(length):
    """metric(y, token_dim) -> (B, L): high scores at the wanted positions, per sample.

    A plain function (torch.fx needs the target's __name__): its table is read when the pruned graph
    RUNS, so one compiled model serves several keep sets of the same size (compiling is the slow part
    of these tests); `metric.use(keep_sets)` switches the keep set."""
    state = {"table": torch.zeros(1, length)}

    def use(keep_sets):
        table = torch.zeros(len(keep_sets), length)
        for b, keep in enumerate(keep_sets):
            table[b, keep] = 10.0 + torch.arange(len(keep), dtype=torch.float32)
        state["table"] = table - torch.arange(length, dtype=torch.float32) * 1e-3  # no ties elsewhere

    def metric(y, token_dim):
        batch = y.shape[0]
        return torch.zeros(batch, y.shape[token_dim], device=y.device) + state["table"][:batch].to(y.device)

    metric.use = use
    return metric


# ------------------------------------------------------------------------------- reference ops

def seq_scan(u, delta, A, B, C, D, z=None, delta_bias=None, gap=None):
    """Sequential Mamba-1 scan. u, delta: (b, E, T); A: (E, N); B, C: (b, N, T); gap: (b, T)."""
    delta = F.softplus(delta + delta_bias[None, :, None]) if delta_bias is not None else F.softplus(delta)
    batch, E, T = u.shape
    h = u.new_zeros(batch, E, A.shape[1])
    ys = []
    for t in range(T):
        g = 1.0 if gap is None else gap[:, t][:, None, None]
        decay = torch.exp(g * delta[:, :, t, None] * A[None])
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1) + D[None] * u[:, :, t])
    y = torch.stack(ys, dim=-1)
    if z is not None:
        y = y * F.silu(z)
    return y


def take_tokens(x, index):
    """x (b, T, C), index (b, K) -> (b, K, C)."""
    return torch.stack([x[b, index[b]] for b in range(x.shape[0])])


def put_tokens(x, index, length):
    """(b, K, C) -> zero (b, length, C) with x at `index`."""
    out = x.new_zeros(x.shape[0], length, x.shape[2])
    for b in range(x.shape[0]):
        out[b, index[b]] = x[b]
    return out


def conv1d_at(x, conv, pos, length, flipped=False):
    """Causal depthwise conv of kept tokens at claimed positions `pos` in a zero sequence of `length`.

    x: (b, E, K). Forward: out at p = bias + sum_j w[j] x[p - (W-1) + j]; flipped (ViM backward,
    the conv runs on the reversed sequence): out at p = bias + sum_j w[j] x[p + (W-1) - j].
    """
    W = conv.weight.shape[-1]
    w = conv.weight[:, 0, :]  # (E, W)
    dense = put_tokens(x.transpose(1, 2), pos, length)  # (b, length, E)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for k, p in enumerate(pos[b].tolist()):
            acc = conv.bias.clone()
            for j in range(W):
                q = p - (W - 1) + j if not flipped else p + (W - 1) - j
                if 0 <= q < length:
                    acc = acc + w[:, j] * dense[b, q]
            out[b, :, k] = acc
    return out


# ------------------------------------------------------------------------------------------ ViM

def vim_model(seed=0):
    torch.manual_seed(seed)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=3, embed_dim=32, d_state=4, num_classes=10)
    with torch.no_grad():
        for layer in model.layers:
            m = layer.mixer
            for name in ("A_log", "A_b_log"):
                getattr(m, name).copy_(torch.log(torch.empty_like(getattr(m, name)).uniform_(0.3, 1.5)))
            for name in ("D", "D_b"):
                getattr(m, name).uniform_(-1.0, 1.0)
            for dt_proj in (m.dt_proj, m.dt_proj_b):
                dt_proj.bias.uniform_(-0.5, 1.0)   # softplus -> delta ~ 0.5..1.3: strong mixing
            layer.norm.weight.uniform_(0.5, 1.5)
        model.norm_f.weight.uniform_(0.5, 1.5)
    return model.eval()


def vim_stem(model, x):
    t = model.patch_embed(x)
    M = model.token_position
    cls = model.cls_token.expand(t.shape[0], -1, -1)
    return torch.cat((t[:, :M], cls, t[:, M:]), dim=1) + model.pos_embed


def vim_direction(m, xz, conv1d, x_proj, dt_proj, A_log, D, pos, length, flipped, gap):
    """One direction of BiMambaV2 on kept tokens. xz: (b, 2E, K) already in this direction's scan
    order; pos: claimed positions in that same order; gap: (b, K) or None."""
    x, z = xz.chunk(2, dim=1)
    x = F.silu(conv1d_at(x, conv1d, pos, length, flipped))
    dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = (dt @ dt_proj.weight.T).transpose(1, 2)
    A = -torch.exp(A_log)
    return seq_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=dt_proj.bias, gap=gap)


def vim_mixer(m, h, pos, length, mode):
    """BiMambaV2 on kept tokens h (b, K, Dm) with claimed (sorted) positions pos (b, K)."""
    xz = m.in_proj(h).transpose(1, 2)
    if mode == "decay":
        # forward path step of position p is p; backward (flipped) path step is length - 1 - p
        gap_f = torch.cat([pos[:, :1] + 1, pos[:, 1:] - pos[:, :-1]], dim=1).float()
        rpos = pos.flip(-1)
        gap_b = torch.cat([length - rpos[:, :1], rpos[:, :-1] - rpos[:, 1:]], dim=1).float()
    else:
        gap_f = gap_b = None
    y_f = vim_direction(m, xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, pos, length, False, gap_f)
    # backward: kept tokens visited in reverse order; conv neighbours at p+1..p+W-1
    y_b = vim_direction(m, xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b,
                        pos.flip(-1), length, True, gap_b)
    y = (y_f + y_b.flip(-1)) / 2
    return m.out_proj(y.transpose(1, 2))


def vim_reference(model, x, site, keep, mode):
    keep = torch.tensor(keep)
    hidden, residual = vim_stem(model, x), None
    for layer in model.layers[:site]:
        hidden, residual = layer(hidden, residual)
    L = hidden.shape[1]
    hidden, residual = take_tokens(hidden, keep), take_tokens(residual, keep)
    if mode == "none":
        pos, length = torch.arange(keep.shape[1]).expand_as(keep), keep.shape[1]
    else:
        pos, length = keep, L
    for layer in model.layers[site:]:
        residual = residual + hidden
        hidden = vim_mixer(layer.mixer, layer.norm(residual), pos, length, mode)
    out = model.norm_f(residual + hidden)
    slot = (keep == model.token_position).int().argmax(1)  # the class token, wherever it sits
    return model.head(out[torch.arange(out.shape[0]), slot])


# ----------------------------------------------------------------------------------- PlainMamba

def pm_model(seed=0, layers_with_dwconv=(0,)):
    torch.manual_seed(seed)
    model = create_model("plainmamba_l1", img_size=64, depth=3, embed_dim=32, d_state=4, num_classes=10,
                         layers_with_dwconv=layers_with_dwconv)
    with torch.no_grad():
        for layer in model.layers:
            m = layer.mamba
            m.A_log.copy_(torch.log(torch.empty_like(m.A_log).uniform_(0.05, 0.5)))  # long memory
            m.D.uniform_(-1.0, 1.0)
            m.dt_proj.bias.uniform_(-0.3, 0.5)
            m.x_proj.weight.mul_(3.0)            # larger B, C, dt: the scan term dominates the skip term
            m.out_proj.weight.mul_(3.0)
            m.direction_Bs.normal_(0.0, 0.5)     # make the direction bias matter
            if layer.with_dwconv:
                bn = layer.dw[1]
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def grid_op(x, cells, H, W, fn):
    """Kept tokens x (b, K, C) at grid cells (b, K) -> zero H x W grid -> fn -> read back at cells."""
    b, _, C = x.shape
    grid = put_tokens(x, cells, H * W).transpose(1, 2).reshape(b, C, H, W)
    out = fn(grid).reshape(b, C, H * W).transpose(1, 2)
    return take_tokens(out, cells)


def pm_mixer(m, x, cells, orig, mode, bias_at):
    """PlainMamba2D (the official computation) on kept tokens x (b, K, Dm), slot order. cells: claimed
    positions (grid cells) in slot order; orig: original positions. bias_at: "claimed" or "original"
    position for the direction table.

    Each scan's operands are restricted to the kept tokens in their own order and zipped step by step:
    u in the order path k visits the kept tokens, dt / B / C in slot (raster) order; the direction
    offset added to B is the table's entry at the B token's position; the output follows u's path
    and is put back at u's tokens."""
    H, W = m.grid_size
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    xs = F.silu(grid_op(xs, cells, H, W, m.conv2d))
    dt, B, C = torch.split(m.x_proj(xs), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = m.dt_proj(dt)
    A = -torch.exp(m.A_log)
    y = None
    for k in range(4):
        rank = m.inverse_orders[k]                  # rank[p] = step at which path k visits p
        steps = rank[cells]                         # (b, K) path steps of the kept tokens
        perm = torch.argsort(steps, dim=1)          # path k restricted to the kept tokens
        path_steps = torch.gather(steps, 1, perm)
        table_at = cells if bias_at == "claimed" else orig
        Bk = B + m.direction_Bs[m.directions[k][table_at]]
        gap = None
        if mode == "decay":
            gap = torch.cat([path_steps[:, :1] + 1, path_steps[:, 1:] - path_steps[:, :-1]], dim=1).float()
        y_k = seq_scan(take_tokens(xs, perm).transpose(1, 2), dt.transpose(1, 2), A,
                       Bk.transpose(1, 2), C.transpose(1, 2), m.D,
                       delta_bias=m.dt_proj.bias, gap=gap).transpose(1, 2)
        back = torch.zeros_like(y_k)
        for b in range(x.shape[0]):
            back[b, perm[b]] = y_k[b]                   # back to u's tokens, slot order
        y = back if y is None else y + back
    return m.out_proj(y * F.silu(z))


def pm_reference(model, x, site, keep, mode, bias_at="claimed"):
    keep = torch.tensor(keep)
    t = model.patch_embed(x) + model.pos_embed
    for layer in model.layers[:site]:
        t = layer(t)
    t = take_tokens(t, keep)
    cells = torch.arange(keep.shape[1]).expand_as(keep) if mode == "none" else keep
    for layer in model.layers[site:]:
        t = t + pm_mixer(layer.mamba, layer.norm(t), cells, keep, mode, bias_at)
        if layer.with_dwconv:
            H, W = layer.grid_size
            t = grid_op(t, cells, H, W, layer.dw)
    return model.head(model.norm1(t).mean(dim=1))


# ---------------------------------------------------------------------------------------- tests

def images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


_COMPILED: dict = {}


def pruned_output(model, x, keep, mode, site=1, keep_rate=0.5):
    """Output of compile_pruned(model, {site: keep_rate}, mode) with the keep set forced to `keep`."""
    key = (id(model), mode, site, keep_rate)
    if key not in _COMPILED:
        metric = keep_metric(_length(model))
        metric.use(keep)
        pruned = mambaprune.compile_pruned(model, schedule={site: keep_rate}, alignment=mode, metric=metric,
                                           example_inputs=(x,))
        _COMPILED[key] = (model, pruned, metric)   # keeps `model` alive, so id() stays unique
    _, pruned, metric = _COMPILED[key]
    assert pruned.report.sites == {site: len(keep[0])}
    metric.use(keep)
    with torch.no_grad():
        return pruned(x)


def _length(model):
    return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)


@pytest.fixture(scope="module")
def vim():
    model = vim_model()
    return model, images(32)


@pytest.fixture(scope="module")
def pm():
    # dwconv after block 2 (downstream of the site, so it runs on kept tokens), none in block 0 (the
    # block whose y the site reads): see test_plainmamba_l1_blocks_before_the_site_are_dense
    model = pm_model(layers_with_dwconv=(2,))
    return model, images(64)


def _check_keep_sets(keep, length, protected=()):
    for row in keep:
        assert row == sorted(set(row)) and all(0 <= p < length for p in row)
        assert all(p in row for p in protected)


@pytest.mark.parametrize("site", [1, 2])
@pytest.mark.parametrize("mode", ["hold", "decay", "none"])
def test_vim_matches_definition(vim, mode, site):
    model, x = vim
    _check_keep_sets(VIM_KEEP, 17, protected=[model.token_position])
    got = pruned_output(model, x, VIM_KEEP, mode, site=site)
    with torch.no_grad():
        want = vim_reference(model, x, site, VIM_KEEP, mode)
        dense = model(x)
    assert got.shape == want.shape == dense.shape
    assert (want - dense).abs().max().item() > 1e-2   # pruning is visible at all
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["hold", "decay", "none"])
def test_plainmamba_matches_definition(pm, mode):
    model, x = pm
    _check_keep_sets(PM_KEEP, 16)
    got = pruned_output(model, x, PM_KEEP, mode)
    with torch.no_grad():
        want = pm_reference(model, x, 1, PM_KEEP, mode)
        dense = model(x)
    assert (want - dense).abs().max().item() > 1e-2
    assert (got - want).abs().max().item() <= TOL


def test_plainmamba_none_bias_readings_differ(pm):
    """`none` reads the direction offset at the compacted token's cell (like every other
    position-dependent op under `none`), not at its original position; on this model the two
    readings differ, so test_plainmamba_matches_definition[none] tells them apart."""
    model, x = pm
    with torch.no_grad():
        claimed = pm_reference(model, x, 1, PM_KEEP, "none", bias_at="claimed")
        original = pm_reference(model, x, 1, PM_KEEP, "none", bias_at="original")
    assert (claimed - original).abs().max().item() > 20 * TOL


def test_plainmamba_l1_blocks_before_the_site_are_dense():
    """A site {1: r} prunes AFTER block 0, so L1's dwconv 3x3 after block 0's residual add (still
    inside block 0) sees every token, not zeros at the pruned cells."""
    model, x = pm_model(layers_with_dwconv=(0,)), images(64)   # the real L1: dwconv after block 0
    got = pruned_output(model, x, PM_KEEP, "hold", site=1)
    with torch.no_grad():
        want = pm_reference(model, x, 1, PM_KEEP, "hold")
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["vim", "pm"])
def test_keep_all_hold_is_dense(vim, pm, family):
    model, x = vim if family == "vim" else pm
    everything = [list(range(_length(model)))] * 2
    reference = vim_reference if family == "vim" else pm_reference
    got = pruned_output(model, x, everything, "hold", keep_rate=1.0)
    with torch.no_grad():
        dense = model(x)
        assert (got - dense).abs().max().item() <= 1e-5
        assert (reference(model, x, 1, everything, "hold") - dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["vim", "pm"])
def test_hold_and_decay_differ_with_gaps(vim, pm, family):
    """The keep sets have gaps, so the two modes must give different outputs (else the decay
    comparison above could not fail)."""
    model, x = vim if family == "vim" else pm
    keep = VIM_KEEP if family == "vim" else PM_KEEP
    hold = pruned_output(model, x, keep, "hold")
    decay = pruned_output(model, x, keep, "decay")
    assert (hold - decay).abs().max().item() > 20 * TOL


@pytest.mark.parametrize("mode", ["hold", "decay"])
def test_different_keep_set_changes_output(vim, mode):
    model, x = vim
    a = pruned_output(model, x, VIM_KEEP, mode)
    b = pruned_output(model, x, VIM_KEEP_OTHER, mode)
    with torch.no_grad():
        ref_b = vim_reference(model, x, 1, VIM_KEEP_OTHER, mode)
    assert (a - b).abs().max().item() > 20 * TOL
    assert (b - ref_b).abs().max().item() <= TOL


def test_pm_different_keep_set_changes_output(pm):
    model, x = pm
    other = [[0, 1, 2, 3, 4, 8, 12, 13], [3, 5, 6, 9, 10, 11, 14, 15]]
    a = pruned_output(model, x, PM_KEEP, "hold")
    b = pruned_output(model, x, other, "hold")
    with torch.no_grad():
        ref_b = pm_reference(model, x, 1, other, "hold")
    assert (a - b).abs().max().item() > 20 * TOL
    assert (b - ref_b).abs().max().item() <= TOL
