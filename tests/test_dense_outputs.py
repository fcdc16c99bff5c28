"""Dense outputs (issue 25): a value no site feeds is the model's own, and a token output a site feeds comes
back at full length with one fill (`carry`, `nearest`, `zeros`) that means the same for outputs and stage
ends; multi-scale backbones (ViM features, PlainMamba out_indices, VMamba's detection backbone, a
segmentation decoder) are pruned inside their stages and restored at every read; the planner never keeps
almost nothing to reach a target. Models: tests/dense_models.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from mamba_ssm_stub import installed

import mambaprune
from mambaprune.api.compile import build, prepare
from mambaprune.api.distill import matching_loss, output_distillation_loss
from mambaprune.errors import InvalidArgumentError, UnreachableRatioError
from mambaprune.meta_keys import FLOPS
from mambaprune.planning.plan import MIN_KEPT_FRACTION
from mambaprune.settings import PruneSettings
from tests.dense_models import Segmenter, plainmamba_backbone, vim_features, vmamba_backbone
from tests.test_official_vmamba import cuda_device_is_a_no_op

SITE = 6
EXACT = dict(rtol=1e-6, atol=1e-6)


def run(model, x):
    with torch.no_grad(), cuda_device_is_a_no_op():
        return model(x)


def pruned_positions(kept: torch.Tensor, length: int) -> list:
    """Per sample, the original positions not in `kept` (B, K)."""
    return [sorted(set(range(length)) - set(row.tolist())) for row in kept]


# ------------------------------------------------------------------------------------------------ ViM
@pytest.fixture(scope="module")
def vim():
    model = vim_features()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, x, prepare(model, (x[:1],)), before


@pytest.fixture(scope="module")
def vim_builds(vim):
    _, _, prepared, _ = vim
    return {fill: build(prepared, PruneSettings(schedule={SITE: 0.5}, fill=fill)) for fill in ("carry", "nearest", "zeros")}


@pytest.mark.parametrize("fill", ["carry", "nearest", "zeros"])
def test_a_feature_read_before_the_site_is_the_dense_one(vim, vim_builds, fill):
    model, x, _, _ = vim
    dense, got = run(model, x), run(vim_builds[fill], x)
    torch.testing.assert_close(got[0], dense[0], **EXACT)
    assert not torch.equal(got[1], dense[1])        # read after the site: pruned, restored


def test_carry_puts_back_the_stream_at_the_site_through_the_outputs_own_ops(vim, vim_builds):
    model, x, _, _ = vim
    fast = vim_builds["carry"]
    got = run(fast, x)
    with torch.no_grad():
        stream = model.stream_after(x, SITE)
        normed = model.v.norm_f(stream)
    kept = fast.kept_positions(x)[SITE]
    for b, pruned in enumerate(pruned_positions(kept, stream.shape[1])):
        assert len(pruned) == stream.shape[1] - kept.shape[1] > 0
        torch.testing.assert_close(got[1][b, pruned], stream[b, pruned], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2][b, pruned], normed[b, pruned], rtol=1e-5, atol=1e-5)


def test_nearest_copies_the_nearest_kept_token(vim, vim_builds):
    _, x, _, _ = vim
    fast = vim_builds["nearest"]
    got = run(fast, x)
    kept = fast.kept_positions(x)[SITE]
    for b, pruned in enumerate(pruned_positions(kept, got[1].shape[1])):
        positions = kept[b].tolist()
        for p in pruned:
            nearest = min(positions, key=lambda q: (abs(q - p), q))
            assert torch.equal(got[1][b, p], got[1][b, nearest])
            assert torch.equal(got[2][b, p], got[2][b, nearest])


def test_zeros_leaves_zeros(vim, vim_builds):
    _, x, _, _ = vim
    fast = vim_builds["zeros"]
    got = run(fast, x)
    kept = fast.kept_positions(x)[SITE]
    for b, pruned in enumerate(pruned_positions(kept, got[1].shape[1])):
        assert got[1][b, pruned].abs().max() == 0 and got[2][b, pruned].abs().max() == 0
        assert got[1][b, kept[b]].abs().min() > 0


@pytest.mark.parametrize("fill", ["carry", "nearest", "zeros"])
def test_keeping_every_token_gives_the_dense_outputs_whatever_the_fill(vim, fill):
    model, x, prepared, _ = vim
    keep_all = build(prepared, PruneSettings(schedule={SITE: 1.0, 9: 1.0}, fill=fill))
    for got, dense in zip(run(keep_all, x), run(model, x)):
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_the_report_names_every_restored_output_and_its_fill(vim_builds):
    report = vim_builds["nearest"].report
    assert [(r.what, r.fill, r.site) for r in report.restorations] == [("output[1]", "nearest", SITE),
                                                                         ("output[2]", "nearest", SITE)]
    assert "token outputs restored to full length (fill=nearest): output[1]: nearest; output[2]: nearest" in str(report)


def test_dict_outputs_keep_their_keys_and_are_named_by_them():
    model = vim_features(as_dict=True)
    x = torch.randn(2, 3, 64, 64)
    fast = mambaprune.compile_pruned(model, example_inputs=(x[:1],), schedule={SITE: 0.5})
    got, dense = run(fast, x), run(model, x)
    assert list(got) == list(dense) == ["block2", "block11", "final"]
    torch.testing.assert_close(got["block2"], dense["block2"], **EXACT)
    assert [r.what for r in fast.report.restorations] == ["output['block11']", "output['final']"]


def test_batch_invariance_and_the_users_model_untouched(vim, vim_builds):
    model, x, _, before = vim
    fast = vim_builds["carry"]
    whole = run(fast, x)
    for b in range(x.shape[0]):
        for got, row in zip(run(fast, x[b:b + 1]), whole):
            torch.testing.assert_close(got[0], row[b], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stage_fill_is_the_former_name_of_fill(vim):
    model, x, _, _ = vim
    with pytest.raises(InvalidArgumentError, match="disagree"):
        mambaprune.compile_pruned(model, example_inputs=(x[:1],), schedule={SITE: 0.5}, fill="zeros", stage_fill="carry")
    with pytest.raises(InvalidArgumentError, match="fill must be one of"):
        PruneSettings(fill="last")


# ----------------------------------------------------------------------------------------- PlainMamba
@pytest.fixture(scope="module")
def plainmamba():
    with installed():
        model = plainmamba_backbone()
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        yield model, x, prepare(model, (x[:1],))


def test_plainmamba_out_indices_carry_each_tokens_own_site(plainmamba):
    """Every feature map (B, C, H, W) after layers 2, 5, 8, 11: a token pruned at site s holds the value it had
    there in the pruned model (ln1 applied for the last map). That value is read from the same backbone with
    out_indices s - 1 (the stream after the first s layers), pruned alike: same sites, same kept tokens."""
    model, x, prepared = plainmamba
    fast = build(prepared, PruneSettings(ratio=0.3))
    got = run(fast, x)
    kept = fast.kept_positions(x)
    sites = sorted(kept)
    assert len(sites) == 3 and fast.report.achieved_ratio == pytest.approx(0.3, abs=0.03)
    reader = copy.deepcopy(model)
    reader.out_indices = [s - 1 for s in sites] + [model.num_layers - 1]   # the last keeps every layer alive
    read = build(prepare(reader, (x[:1],)), PruneSettings(schedule=dict(fast.report.keep_rates)))
    assert all(torch.equal(read.kept_positions(x)[s], kept[s]) for s in sites)
    at_site = dict(zip(sites, run(read, x)))
    width = got[0].shape[-1]
    checked = 0
    for out, index in zip(got, model.out_indices):
        for b in range(x.shape[0]):
            alive = set(range(width * width))
            for s in (s for s in sites if s <= index):
                now = set(kept[s][b].tolist())
                for p in sorted(alive - now):
                    value = at_site[s][b, :, p // width, p % width]
                    if index == model.num_layers - 1:
                        value = model.ln1(value)
                    torch.testing.assert_close(out[b, :, p // width, p % width], value, rtol=1e-4, atol=1e-4)
                    checked += 1
                alive = now
    assert checked > 100


def test_plainmamba_keep_all_reproduces_every_map(plainmamba):
    model, x, prepared = plainmamba
    keep_all = build(prepared, PruneSettings(schedule={2: 1.0, 5: 1.0, 8: 1.0}))
    for got, dense in zip(run(keep_all, x), run(model, x)):
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_a_solved_plan_never_keeps_almost_nothing(plainmamba):
    _, _, prepared = plainmamba
    fast = build(prepared, PruneSettings(ratio=0.2, schedule="uniform"))
    floor = math.ceil(MIN_KEPT_FRACTION * prepared.analysis.token_length)
    assert min(fast.report.sites.values()) >= floor
    with pytest.raises(UnreachableRatioError, match="keeping at least 1/8 of the tokens"):
        build(prepared, PruneSettings(ratio=0.7))


# ---------------------------------------------------------------------------------- VMamba, segmentation
def test_vmamba_detection_backbone_is_pruned_in_its_stages_and_restored_at_each_read():
    model = vmamba_backbone(depths=(2, 2, 8, 2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prepared = prepare(model, (x[:1],))
    fast = build(prepared, PruneSettings(ratio=0.3))
    assert fast.report.achieved_ratio == pytest.approx(0.3, abs=0.03)
    lengths = {prepared.analysis.site_length(s) for s in fast.report.sites}
    assert len(lengths) >= 2                      # sites inside more than one stage
    restored = {r.what for r in fast.report.restorations}
    stage_lengths = [d.shape[-1] * d.shape[-2] for d in run(model, x)]
    pruned_stages = {stage_lengths.index(n) for n in lengths}
    assert restored == {f"output[{i}]" for i in pruned_stages}   # the map of every stage with a site
    got, dense = run(fast, x), run(model, x)
    assert [g.shape for g in got] == [d.shape for d in dense]
    for i in range(min(pruned_stages)):                          # maps read before the first site: exact
        torch.testing.assert_close(got[i], dense[i], **EXACT)
    keep_all = build(prepared, PruneSettings(schedule={k: 1.0 for k in fast.report.sites}))
    for g, d in zip(run(keep_all, x), dense):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-5)


def test_a_segmentation_decoder_reads_restored_maps_and_counts_dense():
    with installed():
        model = Segmenter(plainmamba_backbone(), [32] * 4).eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        prepared = prepare(model, (x[:1],))
        fast = build(prepared, PruneSettings(ratio=0.3))
        restored = [r.what for r in fast.report.restorations]
        assert len(restored) == 4 and all(what.startswith("decode_head") for what in restored)   # before the resize
        assert "not understood" not in str(fast.report)

        def decoder_flops(gm):
            return sum(n.meta.get(FLOPS, 0) for n in gm.graph.nodes
                       if "decode_head" in str(n.meta.get("nn_module_stack", "")))
        assert decoder_flops(prepared.captured.gm) > 0
        assert decoder_flops(fast.graph_module) == pytest.approx(decoder_flops(prepared.captured.gm))
        keep_all = build(prepared, PruneSettings(schedule={k: 1.0 for k in fast.report.sites}))
        torch.testing.assert_close(run(keep_all, x), run(model, x), rtol=1e-5, atol=1e-5)
        assert run(fast, x).shape == (2, 11, 32, 32)


# ------------------------------------------------------------------------------------------- recover
def test_matching_loss_is_the_relative_mean_squared_error_per_sample():
    teacher = torch.randn(4, 3, 5, 5)
    student = teacher + 0.1 * torch.randn(4, 3, 5, 5)
    expected = sum(((student[b] - teacher[b]) ** 2).mean() / (teacher[b] ** 2).mean() for b in range(4)) / 8
    assert torch.allclose(matching_loss(student, teacher, global_batch=8), expected)
    dict_loss = output_distillation_loss({"a": student, "b": torch.randn(4, 10)}, {"a": teacher, "b": torch.randn(4, 10)},
                                         2.0, 8)
    assert dict_loss > matching_loss(student, teacher, 8)


def test_recover_distils_every_feature_map_of_a_dict_output_and_touches_neither_model():
    """A random-init model on random images: what recovery must do is lower its own objective, the relative
    squared error of every feature map, on the images it trained on, without touching either model."""
    model = vim_features(as_dict=True)
    x = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fast = mambaprune.compile_pruned(model, example_inputs=(x[:1],), schedule={SITE: 0.5})
    before, dense_before = ({k: v.clone() for k, v in m.state_dict().items()} for m in (fast, model))

    def error(candidate):
        got, dense = run(candidate, x), run(model, x)
        return sum(matching_loss(got[k], dense[k], len(x)).item() for k in dense)
    better = mambaprune.recover(fast, model, x, steps=20, lr=1e-4, batch_size=8, augment="none", progress=False)
    assert error(better) < 0.9 * error(fast)
    assert list(run(better, x[:2])) == ["block2", "block11", "final"]
    assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items())
    assert all(torch.equal(v, dense_before[k]) for k, v in model.state_dict().items())
