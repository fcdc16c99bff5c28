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
from mambaprune import MambapruneError, UnsupportedModelError  # noqa: E402

RATIO = 0.3
TOL = 1e-5

# name -> (description, expected block names)
SUPPORTED = {
    "localmamba": ("LocalMamba-style: 4 directions per block (plain, flip, grid transpose, 2x2 windows), "
                   "own parameters each, summed", [f"mixers.{i}" for i in range(3)]),
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
}

# name -> (description, fragment of the refusal reason)
REFUSED = {
    "mambavision_explicit_attn": ("MambaVision-style with explicit softmax(q @ k.transpose) attention",
                                  "a matmul contracts or mixes the token axis"),
    "mambavision_windowed": ("MambaVision-style windowed (window_partition / window_reverse)",
                             "reshapes the token grid"),
    "vmamba": ("VMamba-style: channels-first, 2 stages + strided-conv downsampling, LayerNorm2d, "
               "4-way cross-scan in ONE grouped scan (B, 4, N, L): pruned inside the last stage only",
               "a new stage starts"),
    "hierarchical_vim": ("hierarchical ViM-like: 2 token stages (64 then 16 tokens), strided conv2d "
                         "downsampling on the grid between them: pruned inside the last stage only",
                         "a new stage starts"),
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
    x = images()
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
    assert report.not_understood == [] and report.unprunable_sites == {}
    assert [b.name for b in report.blocks] == SUPPORTED[name][1]
    x = images()
    with torch.no_grad():
        out, ref = pruned(x), model(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert max_diff(out, ref) > 0, "pruning at 0.3 changed nothing: the pruned tokens were never used?"


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_batch_invariance(name):
    _, pruned = ok(name, RATIO)
    x = images(batch=4, seed=2)
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


def test_hybrid_attention_runs_on_the_kept_tokens():
    """sdpa blocks after the site see K tokens (the pruned graph is cheaper in the attention too)."""
    _, pruned = ok("mambavision_int_padding", RATIO)
    assert list(pruned.report.sites) == [1]
    assert pruned.report.pruned_flops < pruned.report.dense_flops


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
def test_refused_model_with_a_ratio_raises_the_maximum(name):
    _, result = compiled(name, RATIO)
    if isinstance(result, Exception):
        assert isinstance(result, ValueError)
        message = str(result)
        if name in ("hierarchical_vim", "vmamba"):   # refused before the last stage, pruned inside it
            assert "maximum FLOPs reduction" in message and "after blocks [3]" in message, message
        else:
            assert "maximum is 0.0" in message and REFUSED[name][1] in message, message
    else:  # pruned only the understood part: it must then be a correct model
        assert abs(result.report.achieved_ratio - RATIO) <= 0.03
        assert max_diff(result(images()), result(images())) == 0


def test_mambavision_window_reverse_with_int_batch_is_a_capture_error():
    """MambaVision's own window_reverse computes int(batch / windows): export specialises the batch."""
    model = arch.MambaVisionStyle(windowed=True, patch_size=4, conv_padding=1, reverse=arch.window_reverse_int)
    with pytest.raises(UnsupportedModelError, match="dynamic batch size"):
        mambaprune.compile_pruned(model.eval(), ratio=0.0)


def test_vmamba_never_gives_a_wrong_model():
    """Whatever the compiler does with a hierarchical cross-scan model, the result is right or refused."""
    model, dense = ok("vmamba", 0.0)
    x = images()
    with torch.no_grad():
        assert max_diff(dense(x), model(x)) <= TOL
    for schedule in ({1: 0.5},):             # a site inside stage 1 (64 tokens)
        try:
            pruned = mambaprune.compile_pruned(model, schedule=schedule)   # verify=True
        except (ValueError, MambapruneError) as err:
            assert "not possible" in str(err) or "could not" in str(err), str(err)
        else:
            assert pruned(x).shape == model(x).shape


def test_vmamba_report_counts_the_tokens_of_each_stage():
    report = ok("vmamba", 0.0)[1].report
    assert [b.tokens for b in report.blocks] == [64, 64, 16, 16]


def test_refusal_outside_any_submodule_names_the_top_level():
    report = ok("mambavision_windowed", 0.0)[1].report
    assert all(module for module, _ in report.not_understood), report.not_understood


def test_hierarchical_model_prunes_inside_its_last_stage():
    model, _ = ok("hierarchical_vim", 0.0)
    pruned = mambaprune.compile_pruned(model, schedule={3: 0.5})
    assert pruned.report.sites == {3: 8}
    x = images()
    assert pruned(x).shape == model(x).shape


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
            pruned = ", ".join(f"after block {k}: keep {v}/{r.token_length}" for k, v in sorted(r.sites.items()))
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
