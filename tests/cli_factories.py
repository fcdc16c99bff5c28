"""Model factories that the command-line tests name as MODULE:FACTORY."""
import torch

from mambaprune.models import create_model


def tiny_vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=6, embed_dim=32, d_state=4, num_classes=10)


def not_a_model():
    return "a string"


def raising():
    raise RuntimeError("the checkpoint server is down")
