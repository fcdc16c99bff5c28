"""What the benchmarks compute besides calling the library: fidelity.py's paired comparison between
schedules (exact McNemar test), selection_oracle.py's eager pruning, which must be the library's, and
what speed.py counts as a token op."""
import pytest
import torch

from mambaprune import compile_pruned
from mambaprune.data import make_cluttered_digits
from mambaprune.models.pretrained import load_pretrained

from benchmark_modules import load_benchmark

fidelity = load_benchmark("fidelity")
selection_oracle = load_benchmark("selection_oracle")


@pytest.mark.parametrize("wins, losses, expected", [
    (9, 2, 2 * (1 + 11 + 55) / 2 ** 11),   # by hand: 2 * P(X <= 2), X ~ Binomial(11, 1/2)
    (0, 5, 2 / 2 ** 5),
    (3, 3, 1.0),                            # an even split is no evidence either way
    (0, 0, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_tail(wins, losses, expected):
    assert fidelity.mcnemar_exact(wins, losses) == pytest.approx(expected)
    assert fidelity.mcnemar_exact(losses, wins) == pytest.approx(expected)


def test_paired_comparison_counts_the_images_only_one_side_gets_right():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    ours = torch.tensor([0, 1, 2, 9, 9, 5])     # wrong on 3 and 4
    theirs = torch.tensor([0, 9, 9, 3, 9, 5])   # wrong on 1, 2 and 4
    row = fidelity.paired_comparison("auto", "paper", 0.3, ours, theirs, labels)
    assert (row["wins"], row["losses"]) == (2, 1)
    assert row["p_value"] == pytest.approx(1.0)


def test_selection_oracle_prunes_the_vim_exactly_as_compile_pruned_does_with_alignment_none():
    model = load_pretrained("vim_digits").eval()
    test = make_cluttered_digits("test", 24, "one", 64, seed=0)
    compiled = compile_pruned(model, 0.4, (test.inputs[:2],), alignment="none")
    eager = selection_oracle.pruned_forward(model, test.inputs, dict(compiled.report.sites), "novelty", None)
    with torch.no_grad():
        torch.testing.assert_close(eager, compiled(test.inputs), rtol=1e-4, atol=1e-4)


def test_digit_cover_is_the_fraction_of_each_patch_under_the_box():
    model = load_pretrained("vim_digits")
    boxes = torch.tensor([[[4, 8, 8, 12]]])   # rows 4..11, columns 8..19 of a 64x64 image, patches of 8
    cover = selection_oracle.digit_cover(model, boxes, 64)[0]
    patches = torch.cat((cover[:32], cover[33:])).reshape(8, 8)   # drop the middle class token's slot
    assert cover[32] == 0
    assert patches[0, 1] == pytest.approx(0.5) and patches[1, 1] == pytest.approx(0.5)   # half the rows, all columns
    assert patches[0, 2] == pytest.approx(0.25) and patches[1, 2] == pytest.approx(0.25)  # half the rows, half the columns
    assert patches.sum() == pytest.approx(8 * 12 / 64)


def test_the_speed_benchmark_counts_neither_scan_as_a_token_op():
    """Token ops are what pruning adds (score, select, gather, alignment ops); the model's own scans,
    Mamba-1 and Mamba-2, are not, whatever their namespace."""
    from mambaprune.runtime import token_index   # importing the runtime registers the mambaprune:: ops
    speed = load_benchmark("speed")
    ops = torch.ops.mambaprune
    assert not speed.is_token_op(ops.selective_scan.default) and not speed.is_token_op(ops.ssd_scan.default)
    assert speed.is_token_op(ops.pos_conv1d.default) and speed.is_token_op(token_index.gather_tokens)
