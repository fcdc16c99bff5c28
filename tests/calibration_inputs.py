"""The tiny ViM, random calibration batches and the discrepancy measure that the schedule='auto' /
alignment='auto' tests share."""
import torch

from mambaprune.search import output_discrepancy
from mambaprune.models import create_model


def tiny_vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=6, embed_dim=32, d_state=4, num_classes=10).eval()


def random_batches(count=2, size=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=g) for _ in range(count)]


def mean_discrepancy(model, pruned, batches) -> float:
    """What the searches minimise, measured on the modules themselves: mean output_discrepancy."""
    with torch.no_grad():
        return sum(output_discrepancy([model(x)], [pruned(x)]) for x in batches) / len(batches)
