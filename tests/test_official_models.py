"""The authors' code of ViM and PlainMamba (reproduced in tests/official_vim.py and
tests/official_plainmamba.py, run on the mamba_ssm stand-in): their checkpoints load into the
reference models and give their outputs, and compile_pruned prunes their models as they are."""
from __future__ import annotations

import pytest
import torch
from mamba_ssm_stub import installed

import mambaprune
from mambaprune.models import create_model, load_checkpoint

RATIO = 0.3
VIM_TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
PLAINMAMBA_TINY = dict(img_size=32, patch_size=4, depth=8, embed_dim=64, d_state=4, num_classes=10)


@pytest.fixture(scope="module")
def official():
    """The two reproductions, imported and used with the stand-in package installed."""
    with installed():
        import official_plainmamba
        import official_vim
        yield {"vim": official_vim, "plainmamba": official_plainmamba}


def seeded(make, seed=0):
    torch.manual_seed(seed)
    return make().eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(got, want):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, scale)


# -- checkpoints ------------------------------------------------------------------------------------
def test_official_vim_checkpoint_gives_official_outputs(official, tmp_path):
    theirs = seeded(official["vim"].tiny)
    torch.save({"model": theirs.state_dict(), "epoch": 299}, tmp_path / "vim_t.pth")  # as hustvl/Vim releases
    ours = create_model("vim_t", checkpoint=tmp_path / "vim_t.pth", **VIM_TINY).eval()
    with torch.no_grad():
        assert_same_outputs(ours(images()), theirs(images()))


def test_official_plainmamba_checkpoint_gives_official_outputs(official, tmp_path):
    theirs = seeded(official["plainmamba"].tiny_classifier)
    # as mmcls saves: {"meta": ..., "state_dict": {"backbone.*", "head.fc.*"}}
    torch.save({"meta": {"epoch": 300, "mmcls_version": "0.25.0"}, "state_dict": theirs.state_dict()},
               tmp_path / "plainmamba_l1.pth")
    ours = create_model("plainmamba_l1", checkpoint=tmp_path / "plainmamba_l1.pth", **PLAINMAMBA_TINY).eval()
    with torch.no_grad():
        want = theirs(images())
        assert_same_outputs(ours(images()), want)
    assert want.abs().max().item() > 1e-2   # not two zero outputs agreeing


@pytest.mark.parametrize("layout", ["safetensors", "bare", "model", "state_dict", "module_prefix"])
@pytest.mark.parametrize("family, config", [("vim_t", VIM_TINY), ("plainmamba_l1", PLAINMAMBA_TINY)])
def test_checkpoint_round_trip(tmp_path, family, config, layout):
    source = seeded(lambda: create_model(family, **config))
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        wrapped = {"bare": state, "model": {"model": state}, "state_dict": {"state_dict": state},
                   "module_prefix": {"model": {"module." + k: v for k, v in state.items()}}}[layout]
        torch.save(wrapped, path)
    loaded = seeded(lambda: create_model(family, **config), seed=1)
    assert not torch.equal(next(loaded.parameters()), next(source.parameters()))
    load_checkpoint(loaded, path)
    with torch.no_grad():
        assert torch.equal(loaded(images()), source(images()))


def test_checkpoint_of_another_width_names_the_keys_and_the_config_that_fits():
    with torch.device("meta"):
        shapes = create_model("vim_s").state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}    # a ViM-S checkpoint (384)
    with pytest.raises(ValueError) as info:
        load_checkpoint(create_model("vim_t"), state)
    message = str(info.value)
    assert "shape mismatches" in message and "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)" in message
    assert message.endswith("It fits: create_model('vim_s', checkpoint=...)"), message


def test_checkpoint_of_a_tiny_config_suggests_its_sizes():
    state = seeded(lambda: create_model("plainmamba_l1", **PLAINMAMBA_TINY)).state_dict()
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.8\.|unexpected keys") as info:
        load_checkpoint(create_model("plainmamba_l1", img_size=32, patch_size=4, depth=9, embed_dim=64, d_state=4,
                                     num_classes=10), state)
    assert ("create_model('plainmamba_l1', embed_dim=64, depth=8, d_state=4, num_classes=10, img_size=32, "
            "patch_size=4, checkpoint=...)") in str(info.value)


def test_unreadable_checkpoints_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(create_model("vim_t", **VIM_TINY), tmp_path / "missing.pth")
    torch.save({"optimizer": 3, "epoch": 1}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="holds no state dict: its top-level keys are"):
        load_checkpoint(create_model("vim_t", **VIM_TINY), tmp_path / "no_weights.pth")


# -- compile_pruned on the official models -------------------------------------------------------------
@pytest.fixture(scope="module")
def official_plainmamba(official):
    return seeded(official["plainmamba"].tiny_classifier)


def untouched(model):
    """A check that `model` has the parameters and buffers it had when this was called."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    code = type(model).forward.__code__
    return lambda: (type(model).forward.__code__ is code and set(before) == set(model.state_dict())
                    and all(torch.equal(before[k], v) for k, v in model.state_dict().items()))


def test_official_plainmamba_at_ratio_0_is_the_model(official_plainmamba):
    x = images()
    pruned = mambaprune.compile_pruned(official_plainmamba, 0.0, example_inputs=(x[:1],))
    with torch.no_grad():
        assert_same_outputs(pruned(x), official_plainmamba(x))
    assert pruned.report.unprunable_sites == {}, pruned.report.unprunable_sites


@pytest.mark.parametrize("alignment", ["hold", "decay", "none"])
def test_official_plainmamba_is_pruned(official_plainmamba, alignment):
    x = images()
    is_untouched = untouched(official_plainmamba)
    with torch.no_grad():
        dense = official_plainmamba(x)
    pruned = mambaprune.compile_pruned(official_plainmamba, RATIO, example_inputs=(x[:1],), alignment=alignment)
    assert abs(pruned.report.achieved_ratio - RATIO) <= 0.03
    assert len(pruned.report.sites) >= 2
    with torch.no_grad():
        out = pruned(x)
        assert torch.allclose(pruned(x[1:2]), out[1:2], atol=1e-5)      # batch invariance
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    assert is_untouched()
    with torch.no_grad():
        assert torch.equal(official_plainmamba(x), dense)


@pytest.mark.parametrize("ratio", [0.0, RATIO])
def test_official_vim_is_pruned(official, ratio):
    model = seeded(official["vim"].tiny)
    x = images()
    pruned = mambaprune.compile_pruned(model, ratio, example_inputs=(x[:1],))
    with torch.no_grad():
        out, dense = pruned(x), model(x)
    if ratio == 0:
        assert_same_outputs(out, dense)
    else:
        assert abs(pruned.report.achieved_ratio - ratio) <= 0.03
        assert 8 in pruned.report.protected, pruned.report     # the middle class token is never pruned
