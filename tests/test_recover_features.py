"""`recover` for dense outputs: the per-pixel KL (``dense_loss="kl"``), feature matching on the maps a decoder
reads (``features=``), both against direct implementations of their definitions, and that training with them
brings the pruned model's restored maps closer to the dense ones."""
from __future__ import annotations

import math

import pytest
import torch

from mambaprune import compile_pruned, create_model, recover
from mambaprune.api.distill import (
    channel_distillation_loss, feature_matching_loss, matching_loss, output_distillation_loss, pixel_distillation_loss)
from mambaprune.api.recover_features import TeacherFeatures, module_inputs, with_features

SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, d_state=4, out_indices=(1, 3, 5), decoder_width=16)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("vim_t_seg", **SMALL).eval()


@pytest.fixture(scope="module")
def pruned(teacher):
    return compile_pruned(teacher, example_inputs=(images(1, 0),), schedule={2: 0.5, 4: 0.5}, verify=False)


def test_the_per_pixel_kl_is_the_mean_over_pixels_of_the_t_squared_kl_over_classes():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 5, 4, 2, generator=g), torch.randn(3, 5, 4, 2, generator=g)
    T = 2.0
    total = 0.0
    for b in range(3):
        for i in range(4):
            for j in range(2):
                p = torch.softmax(teacher[b, :, i, j].double() / T, 0)
                q = torch.softmax(student[b, :, i, j].double() / T, 0)
                total += T * T * float((p * (p.log() - q.log())).sum()) / 8
    # divided by the global batch (6: this rank holds 3 of it), times the world (2)
    assert pixel_distillation_loss(student, teacher, T, 6, 2).item() == pytest.approx(total / 6 * 2, rel=1e-5)
    assert output_distillation_loss(student, teacher, T, 6, 2, dense="kl").item() == pytest.approx(total / 3, rel=1e-5)
    assert pixel_distillation_loss(teacher, teacher, T, 3).item() == pytest.approx(0.0, abs=1e-6)


def test_the_channel_kl_is_the_mean_over_channels_of_the_t_squared_kl_over_positions():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    T = 2.0
    total = 0.0
    for b in range(2):
        for c in range(3):
            p = torch.softmax(teacher[b, c].flatten().double() / T, 0)
            q = torch.softmax(student[b, c].flatten().double() / T, 0)
            total += T * T * float((p * (p.log() - q.log())).sum()) / 3
    assert channel_distillation_loss(student, teacher, T, 4, 2).item() == pytest.approx(total / 4 * 2, rel=1e-5)
    # a constant added to each channel's whole map (a different one per channel) changes nothing
    assert channel_distillation_loss(student + torch.arange(3.0).view(1, 3, 1, 1), student, T, 2).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_auto_distils_a_lone_dense_output_channel_wise_and_maps_in_a_container_by_relative_squared_error():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    direct = sum(float(((student[b] - teacher[b]) ** 2).mean() / (teacher[b] ** 2).mean()) for b in range(2)) / 2
    assert output_distillation_loss(student, teacher, 2.0, 2, dense="mse").item() == pytest.approx(direct, rel=1e-5)
    assert output_distillation_loss({"a": student}, {"a": teacher}, 2.0, 2).item() == pytest.approx(direct, rel=1e-5)
    channel = channel_distillation_loss(student, teacher, 2.0, 2).item()
    assert output_distillation_loss(student, teacher, 2.0, 2).item() == pytest.approx(channel, rel=1e-6)
    # not a softmax over the last dim alone (what a lone dense output got before): a shift per row matters
    rows = student + torch.randn(2, 5, 4, 1, generator=g)
    assert output_distillation_loss(rows, teacher, 2.0, 2).item() != pytest.approx(channel, rel=1e-3)


def test_feature_matching_sums_relative_squared_errors_over_the_pairs():
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, generator=g)]
    t = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, generator=g)]
    direct = sum(float(((a[b] - c[b]) ** 2).mean() / (c[b] ** 2).mean()) for a, c in zip(s, t) for b in range(2)) / 4
    assert feature_matching_loss(s, t, 4).item() == pytest.approx(direct, rel=1e-5)
    assert feature_matching_loss(s, t, 4).item() == pytest.approx(sum(matching_loss(a, c, 4).item() for a, c in zip(s, t)))


def test_the_pruned_graph_returns_the_maps_the_decoder_reads_equal_to_the_teachers_when_all_are_kept(teacher):
    x = images(4, 1)
    keep_all = compile_pruned(teacher, example_inputs=(x[:1],), schedule={2: 1.0, 4: 1.0}, verify=False)
    assert len(module_inputs(keep_all.graph_module.graph, "decode_head")) == 3
    module = with_features(keep_all.graph_module, ("decode_head",))
    with torch.no_grad(), TeacherFeatures(teacher, ("decode_head",)) as taught:
        dense = teacher(x)
        maps = taught.take()
        (output,), features = module(x)
    assert [m.shape for m in maps] == [(4, 32, 8, 8)] * 3
    torch.testing.assert_close(output, dense, rtol=1e-5, atol=1e-5)
    for got, want in zip(features, maps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the module shares the student's weights: a change to one is a change to the other
    with torch.no_grad():
        keep_all.graph_module.get_parameter(next(n for n, _ in keep_all.graph_module.named_parameters())).mul_(2)
        assert not torch.allclose(module(x)[0][0], output)


def map_distance(model, teacher, x) -> float:
    module = with_features(model.graph_module, ("decode_head",))
    with torch.no_grad(), TeacherFeatures(teacher, ("decode_head",)) as taught:
        teacher(x)
        return feature_matching_loss(module(x)[1], taught.take(), len(x)).item()


def test_recover_with_feature_matching_brings_the_restored_maps_closer_to_the_dense_ones(teacher, pruned):
    x, held_out = images(32, 2), images(16, 3)
    before = map_distance(pruned, teacher, held_out)
    plain = recover(pruned, teacher, x, steps=8, lr=1e-3, batch_size=8, augment="none", progress=False)
    matched = recover(pruned, teacher, x, steps=8, lr=1e-3, batch_size=8, augment="none", features="decode_head",
                      feature_weight=1.0, progress=False)
    after, after_plain = map_distance(matched, teacher, held_out), map_distance(plain, teacher, held_out)
    assert after < 0.9 * before and after < after_plain
    record = matched.report.recovery
    assert record.features == ("decode_head",) and record.feature_weight == 1.0 and math.isfinite(record.losses[-1])
    assert "features of decode_head x 1" in str(record)
    # the model passed in and the teacher keep their weights: the distance is the one measured before
    assert map_distance(pruned, teacher, held_out) == pytest.approx(before, rel=1e-6)


def test_recover_with_the_per_pixel_kl_lowers_it(teacher, pruned):
    x = images(16, 4)

    def kl(model):
        with torch.no_grad():
            return pixel_distillation_loss(model(x), teacher(x), 1.0, len(x)).item()
    better = recover(pruned, teacher, x, steps=8, lr=1e-3, batch_size=8, augment="none", dense_loss="kl",
                     temperature=1.0, progress=False)
    assert kl(better) < 0.9 * kl(pruned)
    assert better.report.recovery.dense_loss == "kl" and "per-pixel KL" in str(better.report.recovery)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(dense_loss="ce"), ValueError, "dense_loss must be one of 'auto', 'mse', 'kl', 'channel'"),
    (dict(features="decoder"), ValueError, "features names 'decoder', which is not a submodule"),
    (dict(features=[3]), TypeError, "features must be a submodule name or a sequence of names"),
    (dict(features="decode_head", feature_weight=0.0), ValueError, "feature_weight must be a positive number"),
    (dict(features="decode_head", feature_weight=float("nan")), ValueError, "feature_weight must be a positive number"),
    # a block after a site reads pruned tokens: (B, K, C) in the student, (B, L, C) in the teacher
    (dict(features="backbone.layers.5"), ValueError, "differ between the pruned model"),
])
def test_bad_values_are_refused_naming_the_option(teacher, pruned, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        recover(pruned, teacher, images(4, 5), steps=1, batch_size=4, progress=False, **kwargs)


def test_output_maps_distilled_channel_wise_recover_at_the_dense_lr_unless_told_otherwise(teacher, pruned):
    """lr=None: DENSE_LR for per-pixel logits distilled channel-wise ("auto" on a lone output, "channel"),
    DEFAULT_LR for the other losses and for classification logits; an lr given is used as given."""
    from mambaprune.api.recover import DEFAULT_LR, DENSE_LR, default_lr
    assert (default_lr(pruned, "auto"), default_lr(pruned, "channel")) == (DENSE_LR, DENSE_LR)
    assert (default_lr(pruned, "kl"), default_lr(pruned, "mse")) == (DEFAULT_LR, DEFAULT_LR)
    torch.manual_seed(0)
    classifier = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
    assert default_lr(compile_pruned(classifier.eval(), ratio=0.3, verify=False), "auto") == DEFAULT_LR
    assert recover(pruned, teacher, images(4, 2), steps=1, batch_size=4, progress=False).report.recovery.lr == DENSE_LR
    assert recover(pruned, teacher, images(4, 2), steps=1, batch_size=4, lr=5e-4,
                   progress=False).report.recovery.lr == 5e-4
