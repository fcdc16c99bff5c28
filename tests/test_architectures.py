"""compile_pruned on architectures written in other people's styles (tests/architectures.py).

For every style: ratio 0 reproduces the model. Where pruning is supported: ratio 0.3 reaches
0.3 +- 0.03 (measured FLOPs), output shape kept, batch invariance, the report names the blocks.
Where it is refused: the refusal names what was not understood, and asking for a ratio raises a
ValueError that says the maximum; never a wrong model.

`python tests/test_architectures.py` prints the "supported architectures" table (README).
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402

import mambaprune  # noqa: E402
from mambaprune import UnreachableRatioError, UnsupportedModelError  # noqa: E402

RATIO = 0.3
TOL = 1e-5

# name -> (description, expected block names)
SUPPORTED = {
    "localmamba": ("LocalMamba-style: 4 directions per block (plain, flip, grid transpose, 2x2 windows), "
                   "own parameters each, summed", [f"mixers.{i}" for i in range(3)]),
    "localmamba_7x7": ("LocalMamba-style on a 14 x 14 grid: plain, flip, transpose, 2x2 and 7x7 windows",
                       [f"mixers.{i}" for i in range(3)]),
    "localmamba_view_windows": ("LocalMamba-style window-by-window scan order written as x.view(B, H // w, w, W // w, "
                                "w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, L, C), inverse after the scan",
                                [f"mixers.{i}" for i in range(3)]),
    "localmamba_stack_sum": ("LocalMamba-style directions combined with torch.stack(...).sum(0)",
                             [f"mixers.{i}" for i in range(3)]),
    "localmamba_cat_tokens": ("LocalMamba-style directions concatenated on the token axis, reshaped to "
                              "(B, directions, L, C) and summed", [f"mixers.{i}" for i in range(3)]),
    "cls_sliced_middle": ("class token in the middle, sliced out (x[:, :M], x[:, M + 1:]) before every mixer and "
                          "concatenated back after it", [f"layers.{i}" for i in range(3)]),
    "cls_head": ("class token at the head, bidirectional", [f"layers.{i}" for i in range(3)]),
    "cls_none_meanpool": ("no class token, mean pool", [f"layers.{i}" for i in range(3)]),
    "cls_head_tail": ("two class tokens (head + tail), read out and concatenated", [f"layers.{i}" for i in range(3)]),
    "einops": ("einops rearrange/repeat/reduce everywhere", [f"blocks.{i}.mixer" for i in range(3)]),
    "weight_matmul_vim": ("hustvl/Vim: in_proj.weight @ rearrange(x, 'b l d -> d (b l)'), middle class token",
                          [f"layers.{i}" for i in range(3)]),
    "mambavision_int_padding": ("MambaVision-style, conv1d padding=1 (= 'same'), concat instead of gate, "
                                "sdpa attention blocks in the same stage", ["blocks.0.mixer", "blocks.1.mixer"]),
    "mambavision": ("MambaVision-style as NVlabs writes it: F.conv1d(padding='same')",
                    ["blocks.0.mixer", "blocks.1.mixer"]),
    "mamba2_layout": ("mamba2 layout (B, L, H, P), per-head scalar A repeated to (H*P, N), "
                      "as mamba_ssm's ssd_selective_scan", [f"layers.{i}.1" for i in range(3)]),
    "vmamba_4_stages": ("VMamba-style: 4 stages (256, 64, 16, 4 tokens) with strided-conv downsampling, "
                        "channels-first, LayerNorm2d, 4-way cross-scan in ONE grouped scan (B, 4, N, L); each "
                        "pruned stage's grid is restored before its downsampling",
                        [f"stages.{s}.blocks.{b}.op" for s, depth in enumerate((2, 2, 4, 2)) for b in range(depth)]),
    "hierarchical_vim": ("hierarchical ViM-like: 2 token stages (64 then 16 tokens) of (B, L, C) sequences, "
                         "transposed and reshaped to the grid for a strided conv2d between them; the pruned "
                         "sequence is restored before the reshape",
                         [f"stage{s}.{i}" for s in (1, 2) for i in range(3)]),
}
# the only sites a hierarchical model may refuse: after the last block of a stage (nothing to prune)
LAST_OF_STAGE = "is the last of its stage"

# name -> (description, fragment of the refusal reason)
REFUSED = {
    "mambavision_windowed": ("MambaVision-style windowed (window_partition / window_reverse)",
                             "reshapes the token grid"),
}

@functools.lru_cache(maxsize=None)
def compiled(name: str, ratio: float):
    """(model, pruned or the exception) — every model is compiled at most once per ratio."""
    model = arch.build(name)
    try:
        return model, mambaprune.compile_pruned(model, ratio=ratio)
    except Exception as err:  # noqa: BLE001 - the tests below look at what was raised
        return model, err


def images(batch=4, seed=1, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def inputs_for(model, batch=4, seed=1):
    return images(batch, seed, getattr(model, "img_size", 32))


def ok(name, ratio):
    model, pruned = compiled(name, ratio)
    if isinstance(pruned, Exception):
        raise pruned
    return model, pruned


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# every style: ratio 0 reproduces the model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SUPPORTED) + sorted(REFUSED))
def test_ratio_zero_reproduces_the_model(name):
    model, pruned = ok(name, 0.0)
    x = inputs_for(model)
    with torch.no_grad():
        assert max_diff(pruned(x), model(x)) <= TOL
    assert pruned.report.sites == {}
    assert pruned.report.blocks, "the scans were not found"


# ---------------------------------------------------------------------------------------------
# supported styles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_ratio_is_reached_shape_kept_and_blocks_named(name):
    model, pruned = ok(name, RATIO)
    report = pruned.report
    assert abs(report.achieved_ratio - RATIO) <= 0.03, str(report)
    assert report.sites, "nothing was pruned"
    assert report.not_understood == []
    assert all(LAST_OF_STAGE in r for r in report.unprunable_sites.values()), report.unprunable_sites
    assert [b.name for b in report.blocks] == SUPPORTED[name][1]
    x = inputs_for(model)
    with torch.no_grad():
        out, ref = pruned(x), model(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert max_diff(out, ref) > 0, "pruning at 0.3 changed nothing: the pruned tokens were never used?"


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_batch_invariance(name):
    model, pruned = ok(name, RATIO)
    x = inputs_for(model, batch=4, seed=2)
    with torch.no_grad():
        batched = pruned(x)
        for i in (0, 3):
            assert max_diff(pruned(x[i:i + 1])[0], batched[i]) <= TOL


def test_class_tokens_are_protected():
    assert ok("cls_head", RATIO)[1].report.protected == [0]
    assert ok("cls_head_tail", RATIO)[1].report.protected == [0, 17]
    assert ok("weight_matmul_vim", RATIO)[1].report.protected == [8]
    assert ok("cls_none_meanpool", RATIO)[1].report.protected == []


def test_localmamba_sees_every_direction():
    mixing = ok("localmamba", 0.0)[1].report.blocks[0].mixing
    assert mixing.startswith("4 scans (identity, flip, permutation, permutation)")
    mixing = ok("localmamba_7x7", 0.0)[1].report.blocks[0].mixing
    assert mixing.startswith("5 scans (identity, flip, permutation, permutation, permutation)")


# data movement understood by evaluation (analysis/tokens/movement.py): the token maps these styles build
MOVED_TOKENS = ("localmamba_view_windows", "localmamba_stack_sum", "localmamba_cat_tokens", "cls_sliced_middle")


@pytest.mark.parametrize("name", MOVED_TOKENS)
def test_moved_tokens_keep_all_equals_dense_and_the_model_is_untouched(name):
    model = arch.build(name)
    x = inputs_for(model, batch=3, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    sites = list(ok(name, RATIO)[1].report.sites)
    keep_all = mambaprune.compile_pruned(model, schedule={k: 1.0 for k in sites})
    pruned = ok(name, RATIO)[1]
    with torch.no_grad():
        assert max_diff(keep_all(x), before) <= TOL
        out = pruned(x)
        assert torch.isfinite(out).all()
        for i in range(3):
            assert max_diff(pruned(x[i:i + 1])[0], out[i]) <= TOL
        assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_window_order_written_as_a_view_is_the_constant_window_order():
    """x.view(...).permute(...).reshape(...) scans in the same order as x[:, window_order]."""
    as_view = ok("localmamba_view_windows", 0.0)[1].report.blocks[0].mixing
    assert as_view.startswith("2 scans (identity, permutation)"), as_view
    model = arch.build("localmamba_view_windows")
    x = torch.randn(2, 16, 4)
    order = arch.window_order(4, 4, 2)
    mixer = model.mixers[0]
    assert torch.equal(mixer.to_direction(x, "vw2"), x[:, order])
    assert torch.equal(mixer.from_direction(mixer.to_direction(x, "vw2"), "vw2"), x)


def test_hybrid_attention_runs_on_the_kept_tokens():
    """sdpa blocks after the site see K tokens (the pruned graph is cheaper in the attention too)."""
    _, pruned = ok("mambavision_int_padding", RATIO)
    assert list(pruned.report.sites) == [1]
    assert pruned.report.pruned_flops < pruned.report.dense_flops


def test_explicit_attention_after_the_mixers_runs_on_restored_tokens():
    """softmax(q @ k.transpose) written out is not followed by the token rules: the tokens are restored
    (fill carry) before it and it runs densely, so pruning saves only the mixers' share."""
    model = arch.build("mambavision_explicit_attn")
    with pytest.raises(UnreachableRatioError, match="keeping at least 1/8 of the tokens"):
        mambaprune.compile_pruned(model, ratio=RATIO)
    pruned = mambaprune.compile_pruned(model, schedule={1: 0.5})
    restored = {r.what.split("'")[0] for r in pruned.report.restorations}
    assert restored and all(what.startswith("blocks.2") for what in restored), restored   # the attention block
    assert pruned.report.pruned_flops < pruned.report.dense_flops
    keep_all = mambaprune.compile_pruned(model, schedule={1: 1.0})
    with torch.no_grad():
        assert max_diff(keep_all(images()), model(images())) < 1e-5


# ---------------------------------------------------------------------------------------------
# refused styles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusal_names_what_was_not_understood(name):
    _, pruned = ok(name, 0.0)
    report = pruned.report
    fragment = REFUSED[name][1]
    reasons = [r for _, r in report.not_understood] + list(report.unprunable_sites.values())
    assert any(fragment in r for r in reasons), reasons
    assert report.unprunable_sites, "a refused model must say why each site is impossible"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_model_with_a_ratio_is_unsupported(name):
    _, result = compiled(name, RATIO)
    if isinstance(result, Exception):
        assert isinstance(result, UnsupportedModelError)
        message = str(result)
        assert "nothing in this model can be pruned" in message and REFUSED[name][1] in message, message
        assert "the first possible site, after block 1" in message, message
    else:  # pruned only the understood part: it must then be a correct model
        assert abs(result.report.achieved_ratio - RATIO) <= 0.03
        assert max_diff(result(images()), result(images())) == 0


def test_mambavision_window_reverse_with_int_batch_runs_every_batch():
    """MambaVision's own window_reverse computes int(batch / windows): capture routes that int so the
    batch stays symbolic (capture/batch_int.py); the compiled model runs every batch (several windows
    per image: no site here; tests/test_mambavision.py prunes the real package at batches 1-3)."""
    model = arch.MambaVisionStyle(windowed=True, patch_size=4, conv_padding=1, reverse=arch.window_reverse_int)
    dense = mambaprune.compile_pruned(model.eval(), ratio=0.0, example_inputs=(images(),))
    assert dense.report.static_batch is None
    for batch in (1, 2, 3):
        x = images(batch=batch, seed=batch)
        with torch.no_grad():
            assert max_diff(dense(x), model(x)) <= TOL


def test_a_batch_fixed_another_way_is_captured_with_the_example_batch():
    """math.floor of the batch is not routed: export specialises the batch, so the model is captured
    with the example batch and any other batch is refused at call time."""
    model = arch.MambaVisionStyle(windowed=True, patch_size=4, conv_padding=1, reverse=arch.window_reverse_floor)
    x = images()
    pruned = mambaprune.compile_pruned(model.eval(), ratio=0.0, example_inputs=(x,))
    assert pruned.report.static_batch == x.shape[0]
    with torch.no_grad():
        assert max_diff(pruned(x), model(x)) <= TOL
    with pytest.raises(mambaprune.BatchSizeError, match=f"runs only batches of {x.shape[0]}"):
        pruned(x[:1])


def test_vmamba_prunes_every_stage_and_restores_each_grid():
    """Sites in three stages, each stage's grid whole again before its downsampling; the sites after
    a stage's last block are refused (nothing before the downsampling would get cheaper)."""
    model, pruned = ok("vmamba_4_stages", RATIO)
    report = pruned.report
    assert set(report.unprunable_sites) == {2, 4, 8}
    stages = {report.blocks[k - 1].name.split(".")[1] for k in report.sites}
    assert len(stages) == len(report.sites) == 3, report.sites
    assert [b.tokens for b in ok("vmamba_4_stages", 0.0)[1].report.blocks] == [256] * 2 + [64] * 2 + [16] * 4 + [4] * 2


def test_kept_token_maps_draw_each_stage_on_its_own_grid(tmp_path):
    from mambaprune.visualize import plot_kept_tokens

    model, pruned = ok("vmamba_4_stages", RATIO)
    x = inputs_for(model, batch=2)
    kept = pruned.kept_positions(x)
    assert {k: v.shape[1] for k, v in kept.items()} == pruned.report.sites
    assert pruned.report.site_lengths == {1: 256, 3: 64, 6: 16}
    pictures = (x.permute(0, 2, 3, 1) * 0.25 + 0.5).clamp(0, 1)
    path = plot_kept_tokens(pictures, kept, pruned.report, tmp_path / "kept.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("stage_fill", ["carry", "zeros"])
def test_keeping_every_token_in_every_stage_reproduces_the_model(stage_fill):
    model = arch.build("vmamba_4_stages")
    keep_all = mambaprune.compile_pruned(model, schedule={1: 1.0, 3: 1.0, 5: 1.0, 6: 1.0}, stage_fill=stage_fill)
    x = inputs_for(model)
    with torch.no_grad():
        assert max_diff(keep_all(x), model(x)) <= TOL


def test_stage_fill_changes_only_what_the_pruned_cells_hold():
    """carry and zeros differ (the pruned cells feed the downsampling); each is deterministic."""
    model = arch.build("vmamba")
    x = images()
    outs = {}
    for fill in ("carry", "zeros"):
        fast = mambaprune.compile_pruned(model, schedule={1: 0.5}, stage_fill=fill)
        with torch.no_grad():
            outs[fill] = fast(x)
            assert max_diff(outs[fill], fast(x)) == 0
    assert max_diff(outs["carry"], outs["zeros"]) > 1e-4


def test_vmamba_report_counts_the_tokens_of_each_stage():
    report = ok("vmamba", 0.0)[1].report
    assert [b.tokens for b in report.blocks] == [64, 64, 16, 16]


def test_refusal_outside_any_submodule_names_the_top_level():
    report = ok("mambavision_windowed", 0.0)[1].report
    assert all(module for module, _ in report.not_understood), report.not_understood


def test_hierarchical_sequence_model_is_pruned_in_both_stages():
    """(B, L, C) stages: the pruned sequence is restored before the transpose + reshape to the grid."""
    model, pruned = ok("hierarchical_vim", RATIO)
    report, dense = pruned.report, ok("hierarchical_vim", 0.0)[1].report
    assert set(report.sites) == {1, 2, 4} and {dense.blocks[k - 1].tokens for k in report.sites} == {64, 16}
    assert set(report.unprunable_sites) == {3} and LAST_OF_STAGE in report.unprunable_sites[3]


# ---------------------------------------------------------------------------------------------
# the README table
# ---------------------------------------------------------------------------------------------
def summary_rows() -> list:
    rows = []
    for name in list(SUPPORTED) + list(REFUSED):
        description = (SUPPORTED.get(name) or REFUSED[name])[0]
        _, dense = compiled(name, 0.0)
        _, result = compiled(name, RATIO)
        if isinstance(result, Exception):
            reasons = list(dense.report.unprunable_sites.values()) if not isinstance(dense, Exception) else []
            why = reasons[0] if reasons else f"{type(result).__name__}: {result}"
            rows.append((name, description, "nothing", why, "0.000"))
        else:
            r = result.report
            pruned = ", ".join(f"after block {k}: keep {v}/{r.site_lengths.get(k, r.token_length)}"
                               for k, v in sorted(r.sites.items()))
            refused = "; ".join(r.unprunable_sites.values()) or "-"
            rows.append((name, description, pruned, refused, f"{r.achieved_ratio:.3f}"))
    return rows


def summary_table() -> str:
    lines = ["| style | what it is | pruned at ratio 0.3 | refused (why) | FLOPs reduction |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in summary_rows()]
    return "\n".join(lines)


def test_summary_table(capsys):
    table = summary_table()
    with capsys.disabled():
        print("\n" + table)
    assert table.count("\n") == len(SUPPORTED) + len(REFUSED) + 1


if __name__ == "__main__":
    print(summary_table())
