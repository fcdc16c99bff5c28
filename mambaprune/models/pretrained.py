"""The reference checkpoints shipped with the package, trained on cluttered digits (benchmarks/train_reference.py).

Each ``checkpoints/<name>.safetensors`` stores fp16 weights and, in its metadata, the registered
factory, its overrides, the data variant and the dense test accuracy, so ``load_pretrained(name)``
rebuilds the model without any other file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from .factory import create_model

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

# name -> (registered factory, overrides, data variant); the shipped ones: 64x64 inputs, patch 8, 64 patch tokens.
REFERENCE_CONFIGS: Dict[str, tuple] = {
    "vim_digits": ("vim_t", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=8, num_classes=10), "one"),
    "vim_digits_pair": ("vim_t", dict(img_size=96, patch_size=8, embed_dim=96, depth=12, d_state=8, num_classes=10), "two"),
    "plainmamba_digits": ("plainmamba_l1", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=8, num_classes=10), "one"),
    "plainmamba_digits_pair": ("plainmamba_l1", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=8, num_classes=10), "two"),
    # ViM's backbone with bidirectional Mamba-2 (SSD) mixers: 4 heads of 16 per direction, state 16
    "vim2_digits": ("vim2_t", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=16, headdim=16,
                                   num_classes=10), "one"),
    # segmentation (benchmarks/train_segmentation.py): the same backbones, maps after blocks 2, 5, 8, 11,
    # 11 classes (digits and background), trained on two-digit images' masks from the backbones above
    "vim_digits_seg": ("vim_t_seg", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=8, num_classes=11,
                                         out_indices=[2, 5, 8, 11]), "two"),
    "plainmamba_digits_seg": ("plainmamba_l1_seg", dict(img_size=64, patch_size=8, embed_dim=64, depth=12, d_state=8,
                                                        num_classes=11, out_indices=[2, 5, 8, 11]), "two"),
}


@dataclass
class CheckpointInfo:
    name: str
    factory: str
    overrides: dict
    variant: str
    test_accuracy: float  # top-1, or pixel accuracy for a segmentation model
    path: Path
    test_miou: float = float("nan")  # segmentation models: the dense test mIoU

    @property
    def task(self) -> str:
        """"segmentation" (per-pixel logits, a test mIoU recorded) or "classification"."""
        return "classification" if self.test_miou != self.test_miou else "segmentation"


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.safetensors"


def list_pretrained(task: str | None = None) -> List[str]:
    """Names of the shipped checkpoints (``task``: only the "classification" or "segmentation" ones)."""
    names = sorted(p.stem for p in CHECKPOINT_DIR.glob("*.safetensors"))
    return names if task is None else [n for n in names if checkpoint_info(n).task == task]


def checkpoint_info(name: str) -> CheckpointInfo:
    """What the checkpoint ``name`` holds (from its safetensors metadata)."""
    from safetensors import safe_open

    path = checkpoint_path(name)
    if not path.exists():
        raise ValueError(
            f"no shipped checkpoint named {name!r}; available: {', '.join(list_pretrained()) or 'none'} "
            f"(train one with `python benchmarks/train_reference.py --name {name}`)"
        )
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return CheckpointInfo(name, meta["factory"], json.loads(meta["overrides"]), meta["variant"],
                          float(meta.get("test_accuracy", "nan")), path, float(meta.get("test_miou", "nan")))


def load_pretrained(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The shipped model ``name`` in eval mode, weights cast to ``dtype``."""
    from safetensors.torch import load_file

    info = checkpoint_info(name)
    model = create_model(info.factory, **info.overrides)
    state = {k: v.to(dtype) for k, v in load_file(str(info.path)).items()}
    model.load_state_dict(state, strict=True)
    # how the inputs were made (data/cluttered_digits.py: (image - 0.5) / 0.25), as timm models say it
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0,
                            "input_size": (3, info.overrides["img_size"], info.overrides["img_size"])}
    return model.to(dtype).eval()


def save_pretrained(model: nn.Module, name: str, variant: str, test_accuracy: float, path: Path | None = None,
                    test_miou: float | None = None) -> Path:
    """Write ``model`` as an fp16 safetensors checkpoint with the metadata ``load_pretrained`` needs
    (``test_miou``: a segmentation model's dense test mIoU, ``test_accuracy`` then its pixel accuracy)."""
    from safetensors.torch import save_file

    factory, overrides, _ = REFERENCE_CONFIGS[name]
    path = Path(path) if path is not None else checkpoint_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    metadata = {"factory": factory, "overrides": json.dumps(overrides), "variant": variant,
                "test_accuracy": f"{test_accuracy:.4f}"}
    if test_miou is not None:
        metadata["test_miou"] = f"{test_miou:.4f}"
    save_file(state, str(path), metadata=metadata)
    return path
