"""compile_pruned end to end on the reference models: equivalence, plan, invariance, readout."""
import pytest
import torch

import mambaprune
from mambaprune.models import create_model
from mambaprune.runtime import token_index as ti

TINY = {
    "vim_t": dict(img_size=32, patch_size=8, depth=6, embed_dim=32, d_state=4),
    "plainmamba_l1": dict(img_size=64, depth=4, embed_dim=32, d_state=4),
}


def tiny(name, **extra):
    torch.manual_seed(0)
    return create_model(name, **{**TINY[name], **extra}).eval()


def images(model, batch=3, seed=1):
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY))
def test_ratio_zero_reproduces_the_model(name):
    model = tiny(name)
    x = images(model)
    pruned = mambaprune.compile_pruned(model, ratio=0.0)
    assert (pruned(x) - model(x)).abs().max().item() <= 1e-5
    assert len(pruned.report.blocks) == TINY[name]["depth"]
    assert pruned.report.sites == {}


def test_sites_and_kept_counts_are_as_planned():
    model = tiny("vim_t")
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    report = pruned.report
    assert sorted(report.sites) == [1, 2, 4]        # round(6 * 5/24), round(6 * 10/24), round(6 * 15/24)
    keeps = [n.args[3] for n in pruned.graph_module.graph.nodes if n.target is ti.select_tokens]
    assert keeps == [report.sites[k] for k in sorted(report.sites)]
    expected = {}
    current = report.token_length
    for key in sorted(report.keep_rates):
        free = current - 1
        current = expected[key] = 1 + max(1, round(report.keep_rates[key] * free))
    assert report.sites == expected
    tokens, current = [], report.token_length
    for block in report.blocks:
        current = report.sites.get(block.index, current)
        tokens.append(current)
    assert [b.tokens for b in report.blocks] == tokens


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4])
def test_ratio_is_reached_and_shapes_kept(ratio):
    model = tiny("vim_t")
    x = images(model)
    pruned = mambaprune.compile_pruned(model, ratio=ratio)
    assert abs(pruned.report.achieved_ratio - ratio) <= 0.03
    assert pruned(x).shape == model(x).shape


def test_top_schedule_on_vim_s_matches_the_paper_flops_ratio():
    model = create_model("vim_s").eval()
    pruned = mambaprune.compile_pruned(model, schedule="top", verify=False)
    report = pruned.report
    assert report.sites == {5: 158, 10: 127, 15: 102}
    assert report.pruned_flops / report.dense_flops == pytest.approx(3.60 / 5.08, abs=0.01)


@pytest.mark.parametrize("alignment", ["hold", "decay", "none", "none-unsorted"])
def test_batch_invariance_and_determinism(alignment):
    model = tiny("vim_t")
    x = images(model, batch=8)
    pruned = mambaprune.compile_pruned(model, ratio=0.3, alignment=alignment)
    batched = pruned(x)
    for i in (0, 5):
        assert (pruned(x[i:i + 1])[0] - batched[i]).abs().max().item() <= 1e-5
    again = mambaprune.compile_pruned(model, ratio=0.3, alignment=alignment)
    assert torch.equal(again(x), batched)
    assert torch.equal(pruned(x), batched)


def test_plainmamba_batch_invariance_with_schedule():
    model = tiny("plainmamba_l1")
    x = images(model, batch=4)
    pruned = mambaprune.compile_pruned(model, schedule={1: 0.5, 3: 0.5})
    assert pruned.report.sites == {1: 8, 3: 4}
    batched = pruned(x)
    assert (pruned(x[2:3])[0] - batched[2]).abs().max().item() <= 1e-5


def lowest_for_class_token(position):
    def metric(y, token_dim):
        scores = y.movedim(token_dim, 1).flatten(2).abs().sum(-1)
        slot = torch.arange(scores.shape[1], device=scores.device)
        return torch.where(slot == position, torch.full_like(scores, -1e9), scores)
    return metric


@pytest.mark.parametrize("alignment", ["hold", "none-unsorted"])
def test_class_token_is_never_pruned_and_the_readout_follows_it(alignment):
    model = tiny("vim_t")
    x = images(model, batch=4)
    cls = model.token_position
    pruned = mambaprune.compile_pruned(model, schedule={1: 0.3, 3: 0.3}, alignment=alignment,
                                       metric=lowest_for_class_token(cls))
    for idx in pruned.kept_positions(x).values():
        assert (idx == cls).sum(dim=1).eq(1).all()
    # the readout reads the class token: the result cannot depend on which slot it ended up in,
    # so the same keep set listed in another order (none-unsorted) reads the same token state.
    assert pruned.report.protected == [cls]
    assert torch.isfinite(pruned(x)).all()


def test_keep_everything_reproduces_the_model():
    model = tiny("vim_t")
    x = images(model)
    for alignment in ("hold", "decay", "none"):
        pruned = mambaprune.compile_pruned(model, schedule={2: 1.0, 4: 1.0}, alignment=alignment)
        assert (pruned(x) - model(x)).abs().max().item() <= 1e-5


def test_pruning_changes_the_output_but_not_much_for_mild_rates():
    model = tiny("vim_t")
    x = images(model)
    pruned = mambaprune.compile_pruned(model, schedule={3: 0.9})
    diff = (pruned(x) - model(x)).abs().max().item()
    assert diff > 0


def test_inductor_backend_matches_eager():
    model = tiny("vim_t", depth=3)
    x = images(model, batch=2)
    eager = mambaprune.compile_pruned(model, ratio=0.2)
    compiled = mambaprune.compile_pruned(model, ratio=0.2, backend="inductor")
    assert (compiled(x) - eager(x)).abs().max().item() <= 1e-4


def test_users_model_is_untouched():
    model = tiny("vim_t")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(model)
    expected = model(x)
    mambaprune.compile_pruned(model, ratio=0.3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), expected)
    assert model.training is False


def test_report_prints_a_table():
    pruned = mambaprune.compile_pruned(tiny("vim_t"), ratio=0.3)
    text = str(pruned.report)
    assert "pruned before this block" in text and "FLOPs per image" in text
    assert "2 scans (identity, flip) + conv1d" in text


def test_metric_may_be_any_callable():
    import functools

    def weighted(y, token_dim, weight):
        return y.movedim(token_dim, 1).flatten(2).abs().sum(-1) * weight

    model = tiny("vim_t")
    pruned = mambaprune.compile_pruned(model, ratio=0.2, metric=functools.partial(weighted, weight=2.0))
    plain = mambaprune.compile_pruned(model, ratio=0.2, metric="l1")
    x = images(model)
    assert torch.equal(pruned(x), plain(x))      # scaling every score keeps the same tokens


def test_novelty_is_the_distance_from_the_mean_token():
    y = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 4.0]]])      # (B=1, L=3, C=2); mean token (2, 4/3)
    expected = torch.tensor([[(1 + 16 / 9) ** 0.5, (1 + 16 / 9) ** 0.5, 8 / 3]])
    assert torch.allclose(ti.token_scores(y, 1, "novelty"), expected)
    assert torch.allclose(ti.token_scores(y.transpose(1, 2), 2, "novelty-y"), expected)
    grid = y.transpose(1, 2).reshape(1, 2, 3, 1)                    # (B, C, H=3, W=1)
    assert torch.allclose(ti.grid_token_scores(grid, 2, 3, "novelty"), expected)


def test_novelty_keeps_the_tokens_of_the_stream_farthest_from_its_mean():
    """ViM: the stream the next block reads is hidden + residual; at the first site the kept patches
    are its top-K by distance from the sample's mean token, and the class token is always kept."""
    model = tiny("vim_t")
    x = images(model)
    pruned = mambaprune.compile_pruned(model, schedule={2: 0.5})
    kept = pruned.kept_positions(x)[2]
    with torch.no_grad():
        tokens = model.patch_embed(x)
        M = model.token_position
        hidden = torch.cat((tokens[:, :M], model.cls_token.expand(len(x), -1, -1), tokens[:, M:]), 1) + model.pos_embed
        residual = None
        for layer in model.layers[:2]:
            hidden, residual = layer(hidden, residual)
        stream = hidden + residual
        scores = (stream - stream.mean(1, keepdim=True)).norm(dim=-1)
    scores[:, M] = float("inf")
    expected = scores.topk(kept.shape[1], dim=1).indices.sort(dim=1).values
    assert torch.equal(kept, expected)


def test_novelty_y_reads_the_ssm_output_and_differs_from_the_stream():
    model = tiny("vim_t")
    x = images(model)
    on_y = mambaprune.compile_pruned(model, schedule={2: 0.5}, metric="novelty-y").kept_positions(x)[2]
    on_stream = mambaprune.compile_pruned(model, schedule={2: 0.5}).kept_positions(x)[2]
    assert on_y.shape == on_stream.shape and not torch.equal(on_y, on_stream)
