"""mambaprune.data.image_folder: every image Pillow reads under a folder, sized and normalised as batches."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mambaprune import ImageFolderError, MissingDependencyError
from mambaprune.data import image_folder


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def flat(value, height, width):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_every_image_under_the_folder_is_read_recursively_sorted_sized_and_normalised(tmp_path):
    write(tmp_path / "b.png", flat(255, 20, 40))
    write(tmp_path / "sub" / "deeper" / "a.jpg", flat(0, 50, 30))
    write(tmp_path / "c.bmp", np.stack([flat(51, 16, 16)[..., 0], flat(102, 16, 16)[..., 0],
                                        flat(204, 16, 16)[..., 0]], -1))
    (tmp_path / "labels.txt").write_text("not an image")
    batches = list(image_folder(tmp_path, 8, mean=0.5, std=0.25, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    first, second, third = torch.cat(batches)      # sorted paths: b.png, c.bmp, sub/deeper/a.jpg
    assert torch.allclose(first, torch.full((3, 8, 8), (1 - 0.5) / 0.25))
    assert torch.allclose(second[:, 0, 0], (torch.tensor([51, 102, 204]) / 255 - 0.5) / 0.25, atol=1e-6)
    assert third.abs().sub(2).abs().max() < 0.1     # black JPEG (lossy) -> (0 - 0.5) / 0.25


def test_the_shorter_side_is_resized_and_the_centre_cropped(tmp_path):
    picture = np.zeros((10, 30, 3), dtype=np.uint8)
    picture[:, 10:20] = 255                          # a white middle third, left and right black
    write(tmp_path / "wide.png", picture)
    (image,) = next(iter(image_folder(tmp_path, (10, 10), batch_size=4)))
    assert image.shape == (3, 10, 10) and image.min() > 0.99   # the crop is the white centre; [0, 1] without mean/std
    framed = np.full((20, 20, 3), 255, dtype=np.uint8)
    framed[5:15, 5:15] = 0                           # a black centre in a white frame
    write(tmp_path / "wide.png", framed)
    whole, centre = (next(iter(image_folder(tmp_path, 10, crop_pct=c)))[0] for c in (1.0, 0.5))
    assert whole[:, 0, 0].min() > 0.99 and whole[:, 5, 5].max() < 0.01
    assert centre.max() < 0.01                       # timm's crop_pct: resize to 10 / 0.5, crop the centre 10


def test_mean_and_std_come_from_the_model_config_when_not_given(tmp_path):
    write(tmp_path / "x.png", flat(255, 8, 8))
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"mean": (0.2, 0.4, 0.6), "std": (0.5, 0.5, 0.2)}
    (image,) = next(iter(image_folder(tmp_path, 4, model=model)))
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.6, 1.2, 2.0]))
    with pytest.raises(ValueError, match="has no pretrained_cfg / default_cfg with 'mean' and 'std': pass mean="):
        image_folder(tmp_path, 4, model=torch.nn.Linear(1, 1))


def test_shuffle_visits_every_image_once_per_pass_in_a_seeded_order(tmp_path):
    for i in range(6):
        write(tmp_path / f"{i}.png", flat(40 * i, 4, 4))
    values = lambda folder: [round(float(x[0, 0, 0]) * 255) for b in folder for x in b]  # noqa: E731
    folder = image_folder(tmp_path, 4, batch_size=4, shuffle=True, seed=3)
    first, second = values(folder), values(folder)
    assert sorted(first) == sorted(second) == [0, 40, 80, 120, 160, 200] and first != second
    assert values(image_folder(tmp_path, 4, batch_size=4, shuffle=True, seed=3)) == first
    assert len(folder) == 2


def test_a_missing_or_empty_folder_and_an_unreadable_file_are_errors_naming_them(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        image_folder(tmp_path / "nowhere", 8)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageFolderError, match=r"holds no image \(1 file"):
        image_folder(tmp_path, 8)
    write(tmp_path / "good.png", flat(0, 8, 8))
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageFolderError, match="cannot read image file .*broken.jpg"):
        list(image_folder(tmp_path, 8))


def test_without_pillow_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependencyError, match=r"Pillow.*pip install 'mambaprune\[data\]'"):
        image_folder(tmp_path, 8)
