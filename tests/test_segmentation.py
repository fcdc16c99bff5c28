"""Segmentation on cluttered digits (issue 25): the per-pixel masks, the mIoU definition, and the registered
segmentation models (ViM / PlainMamba backbone read at several depths + light decoder) pruned with their maps
restored before the decoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from mambaprune import compile_pruned, create_model  # noqa: E402
from mambaprune.data import (  # noqa: E402
    BACKGROUND, SEG_CLASSES, class_iou, confusion_matrix, make_cluttered_digits, mean_iou, pixel_accuracy)
from mambaprune.data.cluttered_digits import INK_THRESHOLD, _digit_scans, glyph_alpha  # noqa: E402


@pytest.mark.parametrize("variant", ["one", "two"])
def test_masks_mark_each_digits_ink_with_its_class_and_nothing_else(variant):
    data = make_cluttered_digits("val", 6, variant, img_size=64, seed=3, masks=True)
    plain = make_cluttered_digits("val", 6, variant, img_size=64, seed=3)
    assert plain.masks is None and torch.equal(plain.inputs, data.inputs)      # the same images
    assert data.masks.shape == (6, 64, 64) and data.masks.dtype == torch.int64
    scans = _digit_scans()[0]
    for i in range(len(data)):
        expected = torch.full((64, 64), BACKGROUND)
        for (top, left, side, _), digit, scan in zip(data.boxes[i].tolist(), data.digits[i].tolist(), data.scans[i].tolist()):
            ink = glyph_alpha(scans[scan], side)[0] >= INK_THRESHOLD
            expected[top:top + side, left:left + side][ink] = digit
            assert 0.05 < ink.float().mean() < 0.8
        assert torch.equal(data.masks[i], expected)
        assert set(data.masks[i].unique().tolist()) == set(data.digits[i].tolist()) | {BACKGROUND}


def test_masks_are_deterministic_and_need_asking_for():
    a = make_cluttered_digits("test", 3, "two", img_size=64, seed=1, masks=True)
    b = make_cluttered_digits("test", 3, "two", img_size=64, seed=1, masks=True)
    assert torch.equal(a.masks, b.masks)
    batches = list(a.mask_batches(2))
    assert [len(y) for _, y in batches] == [2, 1] and torch.equal(batches[1][1], a.masks[2:])
    with pytest.raises(ValueError, match="masks=True"):
        next(make_cluttered_digits("test", 1, "one", img_size=64).mask_batches(1))


def test_mean_iou_and_pixel_accuracy_match_a_hand_computed_example():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    predicted = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(predicted, target, 4)          # class 3 occurs nowhere
    assert confusion.sum() == 6 and confusion[0, 1] == 1 and confusion[2, 0] == 1
    # class 0: 1 hit, 1 false positive, 1 miss -> 1/3; class 1: 2 / 3; class 2: 1 / 2; class 3 absent
    iou = class_iou(confusion)
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64)) and torch.isnan(iou[3])
    assert mean_iou(confusion) == pytest.approx(0.5)
    assert pixel_accuracy(confusion) == pytest.approx(4 / 6)
    # counts add over images: the two halves' matrices sum to the whole
    halves = confusion_matrix(predicted[:1], target[:1], 4) + confusion_matrix(predicted[1:], target[1:], 4)
    assert torch.equal(halves, confusion)
    # a class only predicted counts with IoU 0
    assert mean_iou(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4)) == pytest.approx(0.25)


SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, d_state=4, out_indices=(2, 5, 8, 11), decoder_width=16)


@pytest.mark.parametrize("name", ["vim_t_seg", "plainmamba_l1_seg"])
def test_segmentation_models_prune_with_their_maps_restored_before_the_decoder(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(x)
    assert dense.shape == (2, SEG_CLASSES, 32, 32)
    fast = compile_pruned(model, 0.3, (x[:1],))
    assert fast.report.achieved_ratio == pytest.approx(0.3, abs=0.04)
    # every map read after the first site (site k: after k blocks; map i: after i + 1 blocks) is restored, once
    fed = [i for i in SMALL["out_indices"] if i + 1 > min(fast.report.sites)]
    assert len(fast.report.restorations) == len(fed) >= 2
    keep_all = compile_pruned(model, example_inputs=(x[:1],), schedule={k: 1.0 for k in fast.report.sites})
    with torch.no_grad():
        pruned = fast(x)
        torch.testing.assert_close(keep_all(x), dense, rtol=1e-5, atol=1e-5)
    assert pruned.shape == dense.shape and not torch.allclose(pruned, dense, atol=1e-4)
    assert np.isfinite(pruned.numpy()).all()


def test_the_benchmark_finds_the_site_each_grid_token_was_pruned_at_skipping_the_class_token():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from segmentation import NEVER, _pruned_at
    # 4 grid tokens and a class token at sequence position 2: sequence = [g0, g1, cls, g2, g3]
    kept = {1: torch.tensor([[0, 2, 3, 4], [1, 2, 3, 4]]), 3: torch.tensor([[2, 4], [1, 2]])}
    got = _pruned_at(kept, 4, 2)
    assert got.tolist() == [[3, 1, 3, NEVER], [1, NEVER, 3, 3]]
    # without a class token the positions are the grid's
    assert _pruned_at({2: torch.tensor([[0, 3]])}, 4, None).tolist() == [[NEVER, 2, 2, NEVER]]
