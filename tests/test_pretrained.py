"""Shipped checkpoints: each loads and reproduces its recorded dense accuracy; save/load round trip."""
import pytest
import torch

pytest.importorskip("safetensors")

from mambaprune.models import pretrained  # noqa: E402
from mambaprune.models.pretrained import (  # noqa: E402
    checkpoint_info,
    list_pretrained,
    load_pretrained,
    save_pretrained,
)


@pytest.mark.parametrize("name", list_pretrained("classification"))
def test_shipped_checkpoint_is_small_and_keeps_its_dense_accuracy(name):
    pytest.importorskip("sklearn")
    from mambaprune.data import make_cluttered_digits

    info = checkpoint_info(name)
    assert info.path.stat().st_size < 20e6
    model = load_pretrained(name)
    test = make_cluttered_digits("test", 200, info.variant, info.overrides["img_size"], seed=0)
    with torch.no_grad():
        accuracy = (model(test.inputs).argmax(-1) == test.labels).float().mean().item()
    # 200 of the 1000 images the recorded accuracy was measured on: allow sampling noise
    assert accuracy >= info.test_accuracy - 0.05


@pytest.mark.parametrize("name", list_pretrained("segmentation"))
def test_shipped_segmentation_checkpoint_is_small_and_keeps_its_dense_miou(name):
    pytest.importorskip("sklearn")
    from mambaprune.data import SEG_CLASSES, confusion_matrix, make_cluttered_digits, mean_iou

    info = checkpoint_info(name)
    assert info.path.stat().st_size < 20e6 and info.task == "segmentation"
    model = load_pretrained(name)
    test = make_cluttered_digits("test", 100, info.variant, info.overrides["img_size"], seed=0, masks=True)
    with torch.no_grad():
        logits = model(test.inputs)
    assert logits.shape == (100, SEG_CLASSES, *test.masks.shape[1:])
    # 100 of the 500 images the recorded mIoU was measured on: allow sampling noise
    assert mean_iou(confusion_matrix(logits.argmax(1), test.masks, SEG_CLASSES)) >= info.test_miou - 0.05


def test_save_and_load_round_trip_in_fp16(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "CHECKPOINT_DIR", tmp_path)
    factory, overrides, variant = pretrained.REFERENCE_CONFIGS["vim_digits"]
    torch.manual_seed(0)
    model = pretrained.create_model(factory, **overrides).eval()
    save_pretrained(model, "vim_digits", variant, 0.5)
    assert list_pretrained() == ["vim_digits"]
    info = checkpoint_info("vim_digits")
    assert (info.factory, info.overrides, info.variant, info.test_accuracy) == (factory, overrides, variant, 0.5)
    loaded = load_pretrained("vim_digits")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float())


def test_unknown_checkpoint_names_the_available_ones():
    with pytest.raises(ValueError, match="no shipped checkpoint named 'nope'; available:"):
        load_pretrained("nope")
