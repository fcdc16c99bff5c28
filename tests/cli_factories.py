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


def vim_feature_dict():
    """A ViM backbone returning a dict of feature maps (after blocks 1 and 4, and the final norm)."""
    from tests.dense_models import ViMFeatures

    return ViMFeatures(tiny_vim(), out_indices=(1, 4), as_dict=True)
