"""float16 and bfloat16 models on the CPU: they compile (the keep-all self-check's tolerance follows
the dtype), ratio 0 is the dense model within that tolerance, and equal scores keep the lower
original positions."""
import copy

import pytest
import torch

import mambaprune
from mambaprune.models import create_model
from mambaprune.rewrite.verify import VERIFY_TOLERANCE, relative_difference, verify_tolerance
from mambaprune.runtime.token_index import select_tokens

HALF = [torch.float16, torch.bfloat16]


def tiny(name):
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
    return create_model(name, **config).eval()


@pytest.fixture(scope="module", params=["vim_t", "plainmamba_l1"])
def model(request):
    return tiny(request.param)


def images(dtype):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)


def test_the_tolerance_follows_the_dtype():
    assert verify_tolerance(torch.float32) == verify_tolerance(torch.float64) == VERIFY_TOLERANCE
    assert verify_tolerance(torch.float16) == 4 * torch.finfo(torch.float16).eps
    assert verify_tolerance(torch.bfloat16) == 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_compiles_and_ratio_0_is_the_dense_model(model, dtype):
    half = copy.deepcopy(model).to(dtype)
    x = images(dtype)
    pruned = mambaprune.compile_pruned(half, 0.3, (x[:1],), schedule={2: 0.6})   # the self-check passes
    dense = mambaprune.compile_pruned(half, 0.0, (x[:1],))
    with torch.no_grad():
        expected = half(x)
        y, y0 = pruned(x), dense(x)
    assert y.dtype == dtype and y.shape == expected.shape and torch.isfinite(y.float()).all()
    assert relative_difference(expected, y0) <= verify_tolerance(dtype)
    assert pruned.report.sites


@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_equal_scores_keep_the_lowest_positions(dtype):
    scores = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0, 1.0, 2.0, 3.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], dtype=dtype)
    positions = torch.arange(8).expand(2, 8)
    none = torch.empty(0, dtype=torch.int64)
    slots = select_tokens(scores, positions, none, 3, sort=True)
    assert slots.tolist() == [[1, 2, 4], [0, 1, 2]]
    protected = torch.tensor([6])
    assert select_tokens(scores, positions, protected, 3, sort=True).tolist() == [[1, 2, 6], [0, 1, 6]]


def test_ties_go_to_the_lower_original_position_whatever_the_slot_order():
    """Under none-unsorted a later site's slots are in top-k order, not in position order."""
    scores = torch.tensor([[2.0, 7.0, 7.0, 7.0, 1.0]])
    positions = torch.tensor([[9, 30, 4, 12, 0]])        # slot -> original position
    none = torch.empty(0, dtype=torch.int64)
    slots = select_tokens(scores, positions, none, 2, sort=False)
    assert positions.gather(1, slots).tolist() == [[4, 12]]
