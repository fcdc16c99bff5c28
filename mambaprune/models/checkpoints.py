"""Loading checkpoints into the reference models: the files their authors release, as they are.

Accepted: safetensors files and PyTorch `.pth` / `.pt` / `.bin` files (read with
`torch.load(weights_only=True)`: no code in the file runs), holding a bare state dict or one
wrapped as `{"model": ...}` (hustvl/Vim's releases), `{"state_dict": ...}` (mmcls's, PlainMamba's)
or `{"module": ...}`, with DDP's `module.` prefix or not. The keys are then mapped to the model's
own names (`checkpoint_key_map`): mmcls classifiers keep the backbone under `backbone.`, the
classifier under `head.fc.` and call the final norm `ln1`. A checkpoint that still does not fit is
refused with the missing, unexpected and mis-shaped keys, and the registered configurations it
would fit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from ..errors import missing_dependency
from ._registry import build_model, list_models

_WRAPPERS = ("model", "state_dict", "module", "model_ema")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual containers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise missing_dependency("safetensors", "bench", "reading a .safetensors checkpoint") from None
        return dict(load_file(str(path)))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with objects torch.load refuses to build, or not a checkpoint at all
        raise ValueError(f"checkpoint {path} could not be read as a PyTorch state dict with weights_only=True "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); save it with "
                         "torch.save(model.state_dict(), path) or as safetensors") from err
    return unwrap(state, str(path))


def unwrap(state, origin: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside `{"model": ...}` / `{"state_dict": ...}` / `{"module": ...}` containers."""
    while isinstance(state, dict) and not _is_state_dict(state):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{origin} holds no state dict: its top-level keys are {sorted(state)[:8]} "
                             f"(expected tensors, or one of {list(_WRAPPERS)})")
        state = inner
    if not isinstance(state, dict):
        raise ValueError(f"{origin} holds a {type(state).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _is_state_dict(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_checkpoint(model: nn.Module, checkpoint) -> nn.Module:
    """Strictly load a checkpoint (a path, or a state dict) into ``model`` (in place; returns it).

    Raises ValueError naming the missing keys, unexpected keys and shape mismatches, and the
    registered configurations that would fit the checkpoint.
    """
    state = read_state_dict(checkpoint) if not isinstance(checkpoint, dict) else unwrap(checkpoint)
    key_map = getattr(model, "checkpoint_key_map", None)
    if key_map is not None:
        state = key_map(state)
    problems = mismatch(model.state_dict(), state)
    if problems:
        origin = f"checkpoint {checkpoint}" if not isinstance(checkpoint, dict) else "the state dict"
        hint = fitting_configs(state)
        raise ValueError(f"{origin} does not match {type(model).__name__}: " + "; ".join(problems)
                         + (f". It fits: {hint}" if hint else ""))
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items()}, strict=True)
    return model


def mismatch(expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> list:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            problems.append(f"{label}: {_abridged(items)}")
    return problems


def _abridged(items: list, most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" ... ({len(items) - most} more)" if len(items) > most else "")


def fitting_configs(state: Dict[str, torch.Tensor]) -> str:
    """`create_model(...)` calls whose model has exactly the checkpoint's keys and shapes: the
    published configurations that fit, or else the sizes read off the checkpoint."""
    published = [name for name in list_models() if _fits(name, {}, state)]
    if published:
        return " or ".join(f"create_model({name!r}, checkpoint=...)" for name in published)
    inferred = infer_config(state)
    for name in list_models() if inferred else ():
        for overrides in [inferred, *({**inferred, **g} for g in _geometries(state))]:
            if _fits(name, overrides, state):
                args = "".join(f", {k}={v!r}" for k, v in overrides.items())
                return f"create_model({name!r}{args}, checkpoint=...)"
    return ""


def _fits(name: str, overrides: dict, state: Dict[str, torch.Tensor]) -> bool:
    """Whether create_model(name, **overrides), built on the meta device, takes `state` as it is."""
    with torch.device("meta"):
        try:
            candidate = build_model(name, **overrides)
        except Exception:  # noqa: BLE001 - an override this family does not take
            return False
    key_map = getattr(candidate, "checkpoint_key_map", None)
    return not mismatch(candidate.state_dict(), key_map(state) if key_map is not None else state)


def _geometries(state: Dict[str, torch.Tensor]) -> Iterable[dict]:
    """img_size / patch_size pairs that give the checkpoint's token count: a square grid of
    `pos_embed`'s tokens (less one class token, or not), patches of the embedding conv's kernel
    (or twice it, behind a stride-2 stem). The caller keeps the one whose shapes all match."""
    pos = state.get("pos_embed", state.get("backbone.pos_embed"))
    conv = next((state[prefix + "patch_embed." + name + ".weight"] for prefix in ("", "backbone.")
                 for name in ("proj", "projection") if prefix + "patch_embed." + name + ".weight" in state), None)
    if pos is None or conv is None or pos.dim() != 3 or conv.dim() != 4:
        return
    kernel = int(conv.shape[-1])
    for tokens in (pos.shape[1] - 1, pos.shape[1]):
        side = int(round(tokens ** 0.5))
        if side > 0 and side * side == tokens:
            for patch in (kernel, 2 * kernel):
                yield {"img_size": side * patch, "patch_size": patch}


def infer_config(state: Dict[str, torch.Tensor]) -> Optional[dict]:
    """embed_dim, depth, d_state, num_classes read off a state dict of a reference model (before or
    after its key map); the grid (img_size, patch_size) is tried by `_geometries`."""
    mapped = state
    for prefix in ("backbone.",):
        if any(k.startswith(prefix) for k in state):
            mapped = {k[len(prefix):]: v for k, v in state.items()}
    depth = 1 + max((int(k.split(".")[1]) for k in mapped if k.startswith("layers.") and k.split(".")[1].isdigit()),
                    default=-1)
    a_log = next((v for k, v in mapped.items() if k.endswith(".A_log")), None)
    pos = mapped.get("pos_embed")
    head = mapped.get("head.weight", mapped.get("head.fc.weight"))
    if depth <= 0 or a_log is None or pos is None:
        return None
    config = {"embed_dim": int(pos.shape[-1]), "depth": depth, "d_state": int(a_log.shape[-1])}
    if head is not None:
        config["num_classes"] = int(head.shape[0])
    return config
