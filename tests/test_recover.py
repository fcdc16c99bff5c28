"""mambaprune.recover: label-free distillation of a pruned model from the dense one.

It lowers the pruned model's discrepancy from the dense one on images it never trained on, leaves the
teacher and the pruned model passed in exactly as they were, is a deterministic function of its seed,
takes a tensor, an iterable or a folder, and its result still exports.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mambaprune
from mambaprune import PrunedModel, recover
from mambaprune.api.distill import distillation_loss, lr_factor
from mambaprune.models import create_model


def tiny_vim():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10).eval()
    with torch.no_grad():   # a random head's logits are nearly flat: sharpen them so there is something to match
        model.head.weight.mul_(4)
        model.head.bias.mul_(4)
    return model


@pytest.fixture(scope="module")
def teacher():
    return tiny_vim()


@pytest.fixture(scope="module")
def pruned(teacher):
    return mambaprune.compile_pruned(teacher, ratio=0.4, alignment="none")


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def kl_to(teacher, model, x):
    with torch.no_grad():
        return F.kl_div(model(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True,
                        reduction="batchmean").item()


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, module.training, \
        [p.requires_grad for p in module.parameters()]


def same(a, b):
    (state_a, training_a, grads_a), (state_b, training_b, grads_b) = a, b
    return (state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
            and training_a == training_b and grads_a == grads_b)


def test_recovery_brings_the_pruned_model_closer_to_the_dense_one_and_touches_neither(teacher, pruned):
    teacher_before, pruned_before = snapshot(teacher), snapshot(pruned)
    held_out = images(64, seed=99)
    before = kl_to(teacher, pruned, held_out)
    result = recover(pruned, teacher, images(480, seed=1), steps=30, lr=1e-3, batch_size=16, progress=False)
    assert isinstance(result, PrunedModel) and result is not pruned
    assert same(snapshot(teacher), teacher_before) and same(snapshot(pruned), pruned_before)
    after = kl_to(teacher, result, held_out)
    assert after < 0.85 * before, (before, after)   # measured: 0.719 -> 0.558
    record = result.report.recovery
    assert record.steps == 30 and len(record.losses) == 30 and record.batch_size == 16 and record.seconds > 0
    assert np.mean(record.losses[-5:]) < np.mean(record.losses[:5])
    assert "recovered: 30 steps of label-free distillation" in str(result.report)
    assert pruned.report.recovery is None and result.report.sites == pruned.report.sites
    assert result.graph_module.training == pruned.graph_module.training
    original = pruned.graph_module.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in result.graph_module.state_dict().items())


def test_the_same_seed_gives_bitwise_the_same_weights_and_another_seed_others(teacher, pruned):
    data = images(48, seed=2)
    run = lambda seed: recover(pruned, teacher, data, steps=4, batch_size=8, seed=seed,  # noqa: E731
                               progress=False).graph_module.state_dict()
    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_list_of_batches_and_a_tensor_cut_into_the_same_batches_train_alike(teacher, pruned):
    data = images(24, seed=3)
    batches = [data[i:i + 8] for i in range(0, 24, 8)]
    from_list = recover(pruned, teacher, batches, steps=5, progress=False)   # the list is started again after 3
    by_hand = recover(pruned, teacher, [batches[i % 3] for i in range(5)], steps=5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(from_list.graph_module.state_dict().values(),
                                                 by_hand.graph_module.state_dict().values()))
    assert from_list.report.recovery.batch_size == "as given"


def test_a_teacher_in_training_mode_is_used_in_eval_mode_and_stays_in_training_mode(pruned):
    teacher = tiny_vim().train()
    before = snapshot(teacher)
    recover(pruned, teacher, images(8, seed=4), steps=1, batch_size=8, progress=False)
    assert same(snapshot(teacher), before) and teacher.training


def test_the_loss_is_t_squared_kl_over_the_global_batch_and_the_schedule_warms_up_then_decays():
    student, target = torch.randn(6, 10), torch.randn(6, 10)
    t = 2.0
    expected = t * t * F.kl_div((student / t).log_softmax(-1), (target / t).log_softmax(-1), log_target=True,
                                reduction="batchmean")
    assert torch.allclose(distillation_loss(student, target, t, 6), expected)
    # two ranks with half the batch each: DDP's mean of their gradients is the one-process gradient
    halves = [distillation_loss(student[i:i + 3], target[i:i + 3], t, 6, world=2) for i in (0, 3)]
    assert torch.allclose((halves[0] + halves[1]) / 2, expected)
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.01


def test_the_recovered_model_exports_to_pt2(teacher, pruned, tmp_path):
    result = recover(pruned, teacher, images(16, seed=5), steps=3, lr=3e-3, batch_size=8, progress=False)
    loaded = torch.export.load(result.export(tmp_path / "recovered.pt2")).module()
    x = images(3, seed=6)
    with torch.no_grad():
        assert (loaded(x) - result(x)).abs().max().item() <= 1e-5
        assert (result(x) - pruned(x)).abs().max().item() > 1e-4   # it is the trained model that was written


def test_a_folder_of_images_is_read_at_the_model_size(teacher, pruned, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    teacher = copy.deepcopy(teacher)
    teacher.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    result = recover(pruned, teacher, tmp_path, steps=2, batch_size=4, progress=False)
    assert result.report.recovery.steps == 2 and all(np.isfinite(result.report.recovery.losses))


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(steps=0), ValueError, "steps must be an int >= 1"),
    (dict(steps=2.5), ValueError, "steps must be an int >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(lr=0.0), ValueError, "lr must be a positive number"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive number"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_bad_settings_name_the_setting(teacher, pruned, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        recover(pruned, teacher, images(4, seed=0), progress=False, **kwargs)


def test_bad_data_says_what_to_pass(teacher, pruned):
    labelled = [(images(4, seed=0), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TypeError, match="label-free, pass the images only"):
        recover(pruned, teacher, labelled, steps=1, progress=False)
    with pytest.raises(ValueError, match="data yielded no batch"):
        recover(pruned, teacher, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="second pass: pass a re-iterable"):
        recover(pruned, teacher, iter([images(4, seed=0)]), steps=2, progress=False)
    with pytest.raises(TypeError, match="a tensor .N, C, H, W., an iterable of image batches or a folder"):
        recover(pruned, teacher, 3, steps=1, progress=False)
    with pytest.raises(TypeError, match="the PrunedModel compile_pruned returned"):
        recover(teacher, teacher, images(4, seed=0), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"input 0 has shape \(4, 3, 16, 16\)"):
        recover(pruned, teacher, torch.randn(4, 3, 16, 16), steps=1, batch_size=4, progress=False)
