"""The cluttered-digits generator: determinism, disjoint splits, labels and geometry."""
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from mambaprune.data import make_cluttered_digits, split_indices  # noqa: E402
from mambaprune.data.cluttered_digits import SPLITS  # noqa: E402


def test_same_seed_same_images_other_seed_other_images():
    a = make_cluttered_digits("train", 6, "two", img_size=64, seed=3)
    b = make_cluttered_digits("train", 6, "two", img_size=64, seed=3)
    c = make_cluttered_digits("train", 6, "two", img_size=64, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_splits_use_disjoint_digit_scans_covering_all_of_them():
    parts = {split: set(split_indices(split).tolist()) for split in SPLITS}
    assert all(not (parts[x] & parts[y]) for x in SPLITS for y in SPLITS if x < y)
    assert set().union(*parts.values()) == set(range(1797))
    assert [len(parts[s]) for s in SPLITS] == [1078, 359, 360]


@pytest.mark.parametrize("split", SPLITS)
def test_images_of_a_split_only_use_its_own_scans(split):
    data = make_cluttered_digits(split, 30, "two", img_size=48)
    assert set(data.scans.flatten().tolist()) <= set(split_indices(split).tolist())
    assert (data.scans[:, 0] != data.scans[:, 1]).all()


def test_labels_boxes_and_value_range():
    one = make_cluttered_digits("val", 8, "one", img_size=96)
    two = make_cluttered_digits("val", 8, "two", img_size=96)
    assert torch.equal(one.labels, one.digits[:, 0])
    assert torch.equal(two.labels, two.digits.sum(1) % 10)
    for data in (one, two):
        top, left, height, width = data.boxes.unbind(-1)
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= 96).all() and (left + width <= 96).all()
        assert ((height >= 34) & (height <= 48)).all()
        pictures = data.pictures()
        assert pictures.shape == (8, 96, 96, 3) and 0 <= pictures.min() and pictures.max() <= 1
    centres = two.boxes[..., :2] + two.boxes[..., 2:] / 2
    assert ((centres[:, 0] - centres[:, 1]).float().norm(dim=-1) >= 48).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="training"), "split must be one of"),
    (dict(variant="three"), "variant must be one of"),
    (dict(size=0), "size >= 1"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    args = dict(split="train", size=2, variant="one")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_cluttered_digits(**args)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    import sys

    from mambaprune.data import cluttered_digits as module
    from mambaprune.errors import MissingDependencyError

    module._digit_scans.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(MissingDependencyError, match=r"scikit-learn.*mambaprune\[data\]"):
            make_cluttered_digits("train", 1)
    finally:
        module._digit_scans.cache_clear()
