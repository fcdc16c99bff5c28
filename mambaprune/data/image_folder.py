"""A folder of images as model-input batches: what calibration and recovery read in real use.

Every file under the folder (recursively) whose suffix Pillow knows (``PIL.Image.registered_extensions()``)
is an image; other files (a README, labels) are not images and are left out. Each image is converted to
RGB, resized so that its shorter side is ``size / crop_pct`` and centre-cropped to ``size`` (timm's
evaluation transform; ``crop_pct`` 1.0 unless given or in the model's config), scaled to [0, 1] and
normalised with ``mean`` / ``std``: given, else the model's ``pretrained_cfg`` / ``default_cfg`` (the dicts
timm models carry), else left in [0, 1]. A file that cannot be decoded raises, naming the file.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ImageFolderError, InvalidArgumentError, missing_dependency

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise missing_dependency("Pillow", "data", "mambaprune.data.image_folder") from err
    return Image


def model_config(model) -> dict:
    """The model's timm-style preprocessing config (``pretrained_cfg`` or ``default_cfg``), or {}."""
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def _per_channel(value, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise InvalidArgumentError(f"image_folder: {name} must be one number or three (per RGB channel){', all > 0' if name == 'std' else ''}; "
                         f"got {value!r}")
    return values


def list_images(path: str | Path) -> list[Path]:
    """The image files under ``path``, sorted; raises when the folder is missing or holds no image."""
    folder = Path(path)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder {str(folder)!r} does not exist (or is not a folder): pass the folder "
                               "that holds the images (any depth of sub-folders)")
    suffixes = {s.lower() for s in _pil().registered_extensions()}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in suffixes]
    if not images:
        raise ImageFolderError(f"image folder {str(folder)!r} holds no image ({len(files)} file(s), none with a suffix "
                               "Pillow reads such as .jpg, .png, .webp): put the images there or pass another folder")
    return images


def load_image(path: Path, size: tuple[int, int], crop_pct: float, interpolation: str) -> torch.Tensor:
    """One file -> a (3, H, W) float tensor in [0, 1] (resize the shorter side, centre crop)."""
    Image = _pil()
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as err:   # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise ImageFolderError(f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}): "
                               "replace or remove the file") from err
    height, width = size
    scale = max(height, width) / crop_pct / min(image.size)
    resized = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    image = image.resize(resized, getattr(Image.Resampling, interpolation.upper()))
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ImageFolder:
    """Batches (B, 3, H, W) of the images of a folder; iterable again and again (``len`` = batches per pass).

    ``shuffle``: every pass visits the files in a new order drawn from ``seed`` and the pass number
    (deterministic); otherwise in sorted path order.
    """

    def __init__(self, files: Sequence[Path], size: tuple[int, int], mean, std, batch_size: int,
                 crop_pct: float = 1.0, interpolation: str = "bilinear", shuffle: bool = False, seed: int = 0):
        self.files, self.size, self.batch_size = list(files), size, batch_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.crop_pct, self.interpolation, self.shuffle, self.seed = crop_pct, interpolation, shuffle, seed
        self.passes = 0

    def __len__(self) -> int:
        return (len(self.files) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = list(range(len(self.files)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + self.passes)).tolist()
        self.passes += 1
        for start in range(0, len(order), self.batch_size):
            chunk = [self.files[i] for i in order[start:start + self.batch_size]]
            images = torch.stack([load_image(f, self.size, self.crop_pct, self.interpolation) for f in chunk])
            yield (images - self.mean) / self.std


def image_folder(path: str | Path, size, *, mean=None, std=None, batch_size: int = 32, model=None,
                 crop_pct: float | None = None, interpolation: str | None = None, shuffle: bool = False,
                 seed: int = 0) -> ImageFolder:
    """The images under ``path`` as normalised batches for ``model``: see the module's docstring.

    size: an int (square) or (height, width). mean / std: per RGB channel (one number or three), for
    images in [0, 1]; None reads them from ``model``'s config (an error if the model has none), or with
    no model leaves the values in [0, 1]. The folder is listed now (errors for a missing or empty folder
    come at once); images are decoded batch by batch as the result is iterated.
    """
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"image_folder: size must be >= 1 and batch_size an int >= 1; got size {size!r}, "
                         f"batch_size {batch_size!r}")
    cfg = model_config(model) if model is not None else {}
    if (mean is None or std is None) and model is not None and not ("mean" in cfg and "std" in cfg):
        raise InvalidArgumentError(f"image_folder: the model ({type(model).__name__}) has no pretrained_cfg / default_cfg with "
                         "'mean' and 'std': pass mean= and std= (per RGB channel, for images in [0, 1])")
    mean = _per_channel(mean if mean is not None else cfg.get("mean", 0.0), "mean")
    std = _per_channel(std if std is not None else cfg.get("std", 1.0), "std")
    crop_pct = float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 1.0))
    interpolation = interpolation or (cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bilinear")
    if not 0 < crop_pct <= 1 or interpolation not in INTERPOLATIONS:
        raise InvalidArgumentError(f"image_folder: crop_pct must be in (0, 1] and interpolation one of {INTERPOLATIONS}; "
                         f"got {crop_pct!r}, {interpolation!r}")
    return ImageFolder(list_images(path), (height, width), mean, std, batch_size, crop_pct, interpolation,
                       shuffle, seed)
