"""The error catalogue: every misuse raises the documented exception type with a useful message."""
import pytest
import torch
import torch.nn as nn

import mambaprune
from mambaprune import MambapruneError, UnreachableRatioError, UnsupportedModelError
from mambaprune.settings import ALIGNMENTS, BACKENDS, FILLS, METRICS
from mambaprune.models import create_model


def tiny_vim(depth=4, **extra):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, depth=depth, embed_dim=32, d_state=4)
    return create_model("vim_t", **{**cfg, **extra}).eval()


@pytest.fixture(scope="module")
def vim():
    return tiny_vim()


@pytest.fixture(scope="module")
def pruned(vim):
    return mambaprune.compile_pruned(vim, ratio=0.3)


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)
    assert issubclass(UnsupportedModelError, MambapruneError)


# -- settings (validated before any capture) --------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1, 1.5, "0.3", True, False, None, float("nan")])
def test_ratio_outside_the_unit_interval(vim, ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        mambaprune.compile_pruned(vim, ratio=ratio)


@pytest.mark.parametrize("option, value, choices", [
    ("alignment", "holdd", ("none", "none-unsorted", "hold", "decay")),
    ("alignment", None, ("none", "none-unsorted", "hold", "decay")),
    ("metric", "l3", METRICS),
    ("fill", "last", FILLS),
    ("backend", "tensorflow", ("eager", "inductor")),
    ("backend", "Eager", ("eager", "inductor")),
])
def test_bad_option_names_list_the_choices(vim, option, value, choices):
    with pytest.raises(ValueError, match=f"{option} must be one of") as info:
        mambaprune.compile_pruned(vim, ratio=0.3, **{option: value})
    message = str(info.value)
    documented = {"alignment": ALIGNMENTS, "metric": METRICS, "backend": BACKENDS, "fill": FILLS}[option]
    assert set(choices) <= set(documented)
    assert all(repr(choice) in message for choice in documented), message
    assert repr(value) in message


@pytest.mark.parametrize("schedule, fragment", [
    ({}, "non-empty dict"),
    ("bottom", "schedule must be None, one of"),
    ("", "schedule must be None, one of"),
    ([(5, 0.8)], "schedule must be None, one of"),
    ({0: 0.8}, "block indices >= 1"),
    ({-1: 0.8}, "block indices >= 1"),
    ({"2": 0.8}, "block indices >= 1"),
    ({True: 0.8}, "block indices >= 1"),
    ({2: 0}, r"keep rates must be in \(0, 1\]"),
    ({2: 0.0}, r"keep rates must be in \(0, 1\]"),
    ({2: 1.5}, r"keep rates must be in \(0, 1\]"),
    ({2: -0.5}, r"keep rates must be in \(0, 1\]"),
    ({2: "0.5"}, r"keep rates must be in \(0, 1\]"),
])
def test_bad_schedule(vim, schedule, fragment):
    with pytest.raises(ValueError, match=fragment):
        mambaprune.compile_pruned(vim, ratio=0.3, schedule=schedule)


def test_settings_are_checked_before_the_model(vim):
    with pytest.raises(ValueError, match="ratio must be"):
        mambaprune.compile_pruned("not a model", ratio=2.0)


@pytest.mark.parametrize("schedule", [{99: 0.5}, {4: 0.5}, {1: 0.8, 7: 0.8}])
def test_schedule_naming_a_missing_site_lists_the_possible_ones(vim, schedule):
    with pytest.raises(ValueError, match=r"Possible sites: \[1, 2, 3\]") as info:
        mambaprune.compile_pruned(vim, ratio=0.3, schedule=schedule)
    assert "4 SSM blocks" in str(info.value)
    assert not isinstance(info.value, UnsupportedModelError)


def test_valid_schedule_compiles(vim):
    pruned = mambaprune.compile_pruned(vim, ratio=0.3, schedule={2: 0.5})
    assert sorted(pruned.report.sites) == [2]


# -- planning ---------------------------------------------------------------------------------------
def test_unreachable_ratio_says_the_maximum():
    model = tiny_vim(depth=2)
    with pytest.raises(UnreachableRatioError, match=r"ratio 0.95 cannot be reached.*maximum") as info:
        mambaprune.compile_pruned(model, ratio=0.95)
    message = str(info.value)
    maximum = float(message.split(" is ")[1].split(" ")[0])
    assert 0 < maximum < 0.92
    # the maximum quoted is indeed reachable
    assert abs(mambaprune.compile_pruned(model, ratio=round(maximum - 0.02, 2)).report.achieved_ratio
               - round(maximum - 0.02, 2)) <= 0.03


def test_single_block_model_cannot_be_pruned():
    model = tiny_vim(depth=1)
    with pytest.raises(UnsupportedModelError, match=r"nothing in this model can be pruned.*1 SSM block"):
        mambaprune.compile_pruned(model, ratio=0.3)
    # ratio 0 is fine: nothing to prune
    assert mambaprune.compile_pruned(model, ratio=0.0).report.sites == {}


class TokenMixingVim(nn.Module):
    """A ViM whose blocks are each followed by a linear layer over the token axis: no site can follow."""

    def __init__(self):
        super().__init__()
        self.vim = tiny_vim(depth=3)
        self.img_size = self.vim.img_size
        tokens = self.vim.patch_embed.num_patches + 1
        self.mix = nn.ModuleList(nn.Linear(tokens, tokens) for _ in self.vim.layers)

    def forward(self, x):
        hidden, residual = self.vim.embed_tokens(x), None
        for layer, mix in zip(self.vim.layers, self.mix):
            hidden, residual = layer(hidden, residual)
            hidden = mix(hidden.transpose(1, 2)).transpose(1, 2)
        return hidden.mean(1)


@pytest.mark.parametrize("ratio, schedule", [(0.3, None), (0.3, "uniform"), (0.0, "top"), (0.0, {1: 0.5}),
                                             (0.3, "auto")])
def test_model_where_nothing_can_be_pruned_names_the_first_block(ratio, schedule):
    model = TokenMixingVim().eval()
    with pytest.raises(UnsupportedModelError,
                       match=r"nothing in this model can be pruned \(the first possible site, after block 1 "
                             r"\(vim\.layers\.0\.mixer\), is refused: .*mix\.0.*token axis"):
        calibration = [torch.randn(2, 3, 32, 32)] if schedule == "auto" else None
        mambaprune.compile_pruned(model, ratio=ratio, schedule=schedule, calibration=calibration)
    assert mambaprune.compile_pruned(model, ratio=0.0).report.unprunable_sites


# -- models that are not SSMs ---------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class SmallViT(nn.Module):
    def __init__(self, dim=32, depth=2, patch=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (32 // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.mark.parametrize("make", [SmallCNN, SmallViT], ids=["cnn", "vit"])
def test_model_without_ssm_is_unsupported(make):
    torch.manual_seed(0)
    model = make().eval()
    with pytest.raises(UnsupportedModelError, match="no selective scan was found") as info:
        mambaprune.compile_pruned(model, ratio=0.3, example_inputs=(torch.randn(1, 3, 32, 32),))
    message = str(info.value)
    assert "looked for" in message and "mambaprune::selective_scan" in message
    assert "register_scan" in message
    assert "A_log" in message


def test_model_that_export_cannot_capture_is_unsupported():
    class DataDependent(nn.Module):
        img_size = 32

        def forward(self, x):
            if x.sum() > 0:                      # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(UnsupportedModelError, match="torch.export could not capture"):
        mambaprune.compile_pruned(DataDependent(), ratio=0.3)


def test_example_inputs_of_the_wrong_size_are_reported(vim):
    with pytest.raises(UnsupportedModelError, match="torch.export could not capture"):
        mambaprune.compile_pruned(vim, ratio=0.3, example_inputs=(torch.randn(1, 3, 24, 24),))


@pytest.mark.parametrize("model", ["not a model", None, 3, torch.randn(2, 3)])
def test_not_a_module_is_a_type_error(model):
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        mambaprune.compile_pruned(model)


# -- calling the pruned model -------------------------------------------------------------------------
def test_pruned_model_runs_on_any_batch(pruned):
    for batch in (1, 2, 5):
        assert pruned(torch.randn(batch, 3, 32, 32)).shape == (batch, 1000)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 3, 32, 16), (2, 1, 32, 32), (3, 32, 32), (1, 2, 3, 32, 32)])
def test_wrong_input_shape_names_the_expected_one(pruned, shape):
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 32, 32\)"):
        pruned(torch.randn(*shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_wrong_input_dtype(pruned, dtype):
    with pytest.raises(ValueError, match=f"has dtype {dtype}; the model was compiled for torch.float32"):
        pruned(torch.zeros(2, 3, 32, 32, dtype=dtype))


def test_wrong_number_of_inputs(pruned):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"takes 1 input\(s\); got 2"):
        pruned(x, x)
    with pytest.raises(ValueError, match=r"takes 1 input\(s\); got 0"):
        pruned()


def test_non_tensor_input(pruned):
    with pytest.raises(ValueError, match=r"input 0 must be a tensor of shape \(batch, 3, 32, 32\)"):
        pruned([[0.0]])
