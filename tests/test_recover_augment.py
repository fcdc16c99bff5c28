"""recover(augment=...): function matching, the dense and the pruned model seeing the same augmented images.

The augmentation is a pure function of (batch, mode, seed, step): deterministic, shape / dtype preserving,
never writing into the batch; a mixup is a convex combination of two images of the batch, a shift a
translation with the borders repeated; inside `recover` the teacher and the student get the very same
tensor, the augmented global batch.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mambaprune
from mambaprune import recover
from mambaprune.api.augment import AUGMENTS, augment_batch, check_augment
from mambaprune.errors import InvalidArgumentError
from mambaprune.models import create_model

recover_module = importlib.import_module("mambaprune.api.recover")   # the module (the package exports the function)


def images(n, seed, size=32, dtype=torch.float32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("mode", AUGMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_it_is_a_pure_seeded_function_keeping_shape_and_dtype(mode, dtype):
    x = images(8, seed=0, dtype=dtype)
    before = x.clone()
    out = augment_batch(x, mode, seed=3, step=5)
    assert torch.equal(x, before)                                       # the caller's tensor is untouched
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(out, augment_batch(x, mode, seed=3, step=5))     # same (seed, step): same images
    if mode == "none":
        assert torch.equal(out, x)
    else:
        assert not torch.equal(out, x)
        assert not torch.equal(out, augment_batch(x, mode, seed=4, step=5))
        assert not torch.equal(out, augment_batch(x, mode, seed=3, step=6))


def test_a_mixup_is_a_convex_combination_of_two_images_of_the_batch():
    x = images(16, seed=1).double()
    out = augment_batch(x, "mixup", seed=0, step=0)
    flat, mixed = x.flatten(1), out.flatten(1)
    lambdas = []
    for i in range(len(x)):
        fits = []   # (residual, lambda) for every possible partner j: out_i = lam x_i + (1 - lam) x_j
        for j in range(len(x)):
            d = flat[i] - flat[j]
            lam = 1.0 if j == i else float((mixed[i] - flat[j]) @ d / (d @ d))
            fits.append(((mixed[i] - (lam * flat[i] + (1 - lam) * flat[j])).abs().max().item(), lam))
        residual, lam = min(fits)
        assert residual < 1e-12 and 0.0 <= lam <= 1.0, (i, residual, lam)
        lambdas.append(lam)
    assert max(lambdas) - min(lambdas) > 0.3   # lambda is drawn per image, over (0, 1)


def test_a_shift_translates_each_image_by_at_most_an_eighth_repeating_its_borders():
    x = images(6, seed=2)
    out = augment_batch(x, "shift", seed=0, step=0)
    m = 4   # 32 / 8
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    offsets = []
    for i in range(len(x)):
        found = [(dy - m, dx - m) for dy in range(2 * m + 1) for dx in range(2 * m + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert found, i
        offsets.append(found[0])
    assert len(set(offsets)) > 1


def test_the_dense_and_the_pruned_model_see_the_same_augmented_global_batches(monkeypatch):
    torch.manual_seed(0)
    teacher = create_model("vim_t", img_size=32, patch_size=8, depth=2, embed_dim=32, d_state=4, num_classes=10).eval()
    pruned = mambaprune.compile_pruned(teacher, ratio=0.3, alignment="none")
    seen = {"teacher": [], "student": []}

    class Recording(torch.nn.Module):
        def __init__(self, module, name):
            super().__init__()
            self.module, self.name = module, name

        def forward(self, x):
            seen[self.name].append(x.clone())
            return self.module(x)

    real_wrap = recover_module.distributed.wrap
    monkeypatch.setattr(recover_module.distributed, "wrap", lambda m, d: Recording(real_wrap(m, d), "student"))
    batches = [images(4, seed=10 + i) for i in range(2)]
    kept = [b.clone() for b in batches]
    result = recover(pruned, Recording(teacher, "teacher"), batches, steps=3, seed=7, augment="mixup+shift",
                     progress=False)
    expected = [augment_batch(batches[step % 2], "mixup+shift", 7, step) for step in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(seen["teacher"], expected)) and len(seen["teacher"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen["student"], expected)) and len(seen["student"]) == 3
    assert not torch.equal(expected[0], batches[0])
    assert all(torch.equal(a, b) for a, b in zip(batches, kept))   # the data passed in is untouched
    assert result.report.recovery.augment == "mixup+shift" and "augment mixup+shift" in str(result.report)


def test_true_and_false_name_the_full_augmentation_and_none():
    assert check_augment(True) == "mixup+shift" and check_augment(False) == "none"
    assert [check_augment(a) for a in AUGMENTS] == list(AUGMENTS)


@pytest.mark.parametrize("value", ["cutmix", "Mixup", None, 1, ("mixup",)])
def test_bad_values_are_refused_naming_the_choices(value):
    with pytest.raises(InvalidArgumentError, match="augment must be one of 'none', 'shift', 'mixup', 'mixup.shift'"):
        check_augment(value)


def test_integer_images_and_a_shift_of_non_images_are_refused():
    with pytest.raises(InvalidArgumentError, match="needs floating-point images"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "mixup", 0, 0)
    with pytest.raises(InvalidArgumentError, match=r"needs images \(N, C, H, W\)"):
        augment_batch(torch.zeros(2, 8), "shift", 0, 0)
    assert augment_batch(torch.ones(2, 8), "mixup", 0, 0).shape == (2, 8)   # a mixup needs only a batch
