"""Multi-scale backbones at realistic depths (issue 25, item 2), and models with tuple / list / dict outputs
through every entry point (item 5).

Four families, each as its authors' detection / segmentation backbone reads it (tests/dense_models.py), with
small widths so each compiles in seconds: ViM with 24 blocks and out_indices [5, 11, 17, 23], PlainMamba with
12 layers and out_indices [2, 5, 8, 11], VMamba-T's stage depths [2, 2, 8, 2] (v05_noz, a normalised map at
the end of each stage, before the downsampling), MambaVision-T's depths [1, 3, 8, 4] on the installed
`mambavision` package (NVlabs' MM_mamba_vision: every level's map after window_reverse, before the
downsampling). For each, `ratio=0.3` with the default schedule: the reduction within the planner's tolerance,
sites inside stages, every map that no site feeds equal to the dense one, every restored map at full
resolution, ratio 0 and keep-all equal to dense, batch invariance, the user's model untouched, verify on.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from mamba_ssm_stub import installed

import mambaprune
from mambaprune.api.compile import build, prepare
from mambaprune.planning import RATIO_TOLERANCE
from mambaprune.rewrite.restore import output_names
from mambaprune.settings import PruneSettings
from tests.dense_models import ViMFeatures, mambavision_backbone, plainmamba_backbone, vim_features, vmamba_backbone
from tests.test_official_vmamba import cuda_device_is_a_no_op

sys.path.insert(0, os.path.dirname(__file__))
import mambavision_stubs  # noqa: E402

mambavision_stubs.install()    # as tests/test_mambavision.py: timm and mamba_ssm's CUDA scan stand-ins

RATIO = 0.3
OUT_INDICES = {"vim": (5, 11, 17, 23), "plainmamba": (2, 5, 8, 11)}
LATE_SITE = {"vim": 12, "plainmamba": 6}       # after the first two maps of each


def run(model, x):
    with torch.no_grad(), cuda_device_is_a_no_op():
        return model(x)


def flat(outputs) -> list:
    return pytree.tree_leaves(outputs)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- families
def _vim():
    return vim_features(depth=24, out_indices=OUT_INDICES["vim"]), torch.randn(2, 3, 64, 64)


def _plainmamba():
    return plainmamba_backbone(num_layers=12, out_indices=OUT_INDICES["plainmamba"]), torch.randn(2, 3, 32, 32)


def _vmamba():
    return vmamba_backbone(depths=(2, 2, 8, 2)), torch.randn(2, 3, 128, 128)


def _mambavision():
    pytest.importorskip("mambavision.models.mamba_vision")
    return mambavision_backbone(depths=(1, 3, 8, 4)), torch.randn(2, 3, 224, 224)


FAMILIES = {"vim": _vim, "plainmamba": _plainmamba, "vmamba": _vmamba, "mambavision": _mambavision}


class Case:
    """One family: the model, images, its prepared graph, the pruned model at 0.3 and the dense outputs."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model, x = FAMILIES[name]()
        self.x = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        self.before = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.dense = run(self.model, self.x)
        self.prepared = prepare(self.model, (self.x[:1],))
        self.pruned = build(self.prepared, PruneSettings(ratio=RATIO))       # verify=True: both checks pass
        self.got = run(self.pruned, self.x)

    @property
    def analysis(self):
        return self.prepared.analysis

    @property
    def sites(self) -> list:
        return sorted(self.pruned.report.sites)

    def output_nodes(self) -> list:
        output = next(n for n in self.prepared.captured.gm.graph.nodes if n.op == "output")
        nodes = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        return list(zip(output_names(output), nodes))


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    if request.param != "plainmamba":
        yield Case(request.param)
        return
    with installed():      # PlainMamba's official code imports mamba_ssm
        yield Case(request.param)


def test_the_reduction_is_the_ratio_within_the_planners_tolerance(case):
    report = case.pruned.report
    assert abs(report.achieved_ratio - RATIO) <= RATIO_TOLERANCE, report
    assert len(case.sites) >= 2
    assert "verified on the example inputs with the pruned run" in str(report)


def test_every_site_lies_inside_a_stage(case):
    """Inside a stage: more of the stage's blocks follow the site (same token length), or the stage's remaining
    work then its downsampling (a stage end: MambaVision's attention blocks after its last mixer). For the
    hierarchical families, the sites' stages are stages with several blocks, not the input of a stage."""
    analysis = case.analysis
    for key in case.sites:
        after = analysis.blocks[key] if key < analysis.depth else None
        same_stage = after is not None and after.token_length == analysis.site_length(key)
        assert same_stage or analysis.sites[key].stage_end is not None, (case.name, key)
    if case.name in ("vmamba", "mambavision"):
        lengths = {analysis.site_length(k) for k in case.sites}
        first_stage = analysis.blocks[0].token_length
        assert lengths and all(n <= first_stage for n in lengths)


def test_maps_no_site_feeds_are_the_dense_ones_and_the_others_come_back_at_full_resolution(case):
    names_nodes = case.output_nodes()
    dense, got = flat(case.dense), flat(case.got)
    assert [g.shape for g in got] == [d.shape for d in dense]            # every map at full resolution
    unfed = [i for i, (_, node) in enumerate(names_nodes) if case.analysis.region(node, case.sites) == 0]
    for i in unfed:
        assert relative_error(got[i], dense[i]) <= 1e-6, (case.name, names_nodes[i][0])
    restored = {r.what for r in case.pruned.report.restorations}
    assert restored and restored.isdisjoint(names_nodes[i][0] for i in unfed)
    assert restored == expected_restored(case)
    for i, (name, _) in enumerate(names_nodes):
        if name in restored:
            assert torch.isfinite(got[i]).all() and relative_error(got[i], dense[i]) > 1e-6


def expected_restored(case) -> set:
    """The maps read inside a pruned stage after its first site: ViM / PlainMamba's maps after the blocks
    out_indices >= the first site; a hierarchical backbone's map of every stage with a site."""
    names = [name for name, _ in case.output_nodes()]
    if case.name in ("vim", "plainmamba"):
        first = case.sites[0]
        return {names[i] for i, index in enumerate(OUT_INDICES[case.name]) if index >= first} | (
            {names[-1]} if case.name == "vim" else set())                  # ViM's final norm
    lengths = {case.analysis.site_length(k) for k in case.sites}
    return {name for name, d in zip(names, flat(case.dense)) if d.shape[-1] * d.shape[-2] in lengths}


def test_isotropic_maps_read_before_a_later_site_are_exact(case):
    """ViM and PlainMamba with one site after their second map (block 12 of 24, 6 of 12): the first two maps
    are the dense ones, the later two are not."""
    if case.name not in ("vim", "plainmamba"):
        pytest.skip("the hierarchical families' early stages are checked by the test above")
    late = build(case.prepared, PruneSettings(schedule={LATE_SITE[case.name]: 0.5}, verify=False))
    got, dense = flat(run(late, case.x)), flat(case.dense)
    for i in (0, 1):
        assert relative_error(got[i], dense[i]) <= 1e-6
    assert all(relative_error(g, d) > 1e-6 for g, d in zip(got[2:], dense[2:]))


def test_mambavision_carry_puts_back_each_tokens_stream_through_window_reverse_and_the_norm(case):
    """MambaVision's stage-3 map after window_reverse is read by outnorm2 and by the downsampling. With
    `carry`, a token pruned at the first site holds the stream it had there (the output of the mixer block
    before the site: one window covers the 14 x 14 grid, so window position p is cell (p // 14, p % 14)),
    passed through window_reverse and outnorm2 (a LayerNorm over the channels of each cell)."""
    if case.name != "mambavision":
        pytest.skip("MambaVision only")
    first = case.sites[0]
    level = case.model.levels[2]
    streams = []
    hook = level.blocks[first - 1].register_forward_hook(lambda module, args, out: streams.append(out))
    try:
        run(case.model, case.x)
    finally:
        hook.remove()
    stream, norm, width = streams[0], case.model.outnorm2, level.window_size
    kept = case.pruned.kept_positions(case.x)[first]
    checked = 0
    for b in range(case.x.shape[0]):
        for p in sorted(set(range(stream.shape[1])) - set(kept[b].tolist())):
            want = torch.nn.functional.layer_norm(stream[b, p], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            torch.testing.assert_close(case.got[2][b, :, p // width, p % width], want, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= case.x.shape[0] * (stream.shape[1] - kept.shape[1]) > 0


def test_ratio_0_and_keeping_every_token_are_the_dense_model(case):
    for settings in (PruneSettings(ratio=0.0, verify=False),
                     PruneSettings(schedule={k: 1.0 for k in case.sites}, verify=False)):
        for got, dense in zip(flat(run(build(case.prepared, settings), case.x)), flat(case.dense)):
            assert relative_error(got, dense) <= 1e-5


def test_each_sample_is_pruned_on_its_own_and_the_users_model_is_untouched(case):
    for b in range(case.x.shape[0]):
        for alone, whole in zip(flat(run(case.pruned, case.x[b:b + 1])), flat(case.got)):
            torch.testing.assert_close(alone[0], whole[b], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, case.before[k]) for k, v in case.model.state_dict().items())
    for again, dense in zip(flat(run(case.model, case.x)), flat(case.dense)):
        assert torch.equal(again, dense)


# ------------------------------------------------------------------- item 5: tuple / list / dict outputs
def small_vim_features(**kwargs) -> ViMFeatures:
    torch.manual_seed(0)
    vim = mambaprune.create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
    return ViMFeatures(vim.eval(), out_indices=(0, 2), **kwargs).eval()


@pytest.fixture(scope="module")
def list_output():
    model = small_vim_features()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, x, mambaprune.compile_pruned(model, RATIO, (x[:1],))


def test_pt2_export_keeps_a_list_output(list_output, tmp_path):
    _, x, pruned = list_output
    loaded = torch.export.load(pruned.export(tmp_path / "features.pt2")).module()
    got, want = loaded(x), run(pruned, x)
    assert isinstance(got, list) and len(got) == len(want) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_list_output_has_one_output_per_map(list_output, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mambaprune.deployment.onnxruntime_backend import OnnxRuntimeModule

    _, x, pruned = list_output
    path = pruned.export(tmp_path / "features.onnx")
    graph = onnx.load(path).graph
    assert len(graph.output) == 3
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in graph.output)     # dynamic batch on every map
    session = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    for batch in (3, 1):
        got, want = session(x[:batch]), run(pruned, x[:batch])
        assert len(got) == 3
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_tuple_output_is_compiled_reported_and_recovered_as_a_tuple(tmp_path):
    class TupleFeatures(ViMFeatures):
        def forward(self, x):
            return tuple(super().forward(x))

    model = TupleFeatures(small_vim_features().v, out_indices=(0, 2)).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pruned = mambaprune.compile_pruned(model, RATIO, (x[:1],))
    got, dense = run(pruned, x), run(model, x)
    assert isinstance(got, tuple) and [g.shape for g in got] == [d.shape for d in dense]
    assert min(pruned.report.sites) > 0                  # the map after block 0 is read before every site
    torch.testing.assert_close(got[0], dense[0], rtol=1e-6, atol=1e-6)
    assert [r.what for r in pruned.report.restorations] == ["output[1]", "output[2]"]
    recovered = mambaprune.recover(pruned, model, x, steps=2, batch_size=8, augment="none", progress=False)
    assert isinstance(run(recovered, x[:2]), tuple)
    assert recovered.report.recovery is not None


def test_the_command_line_compiles_a_dict_output_factory(tmp_path, capsys):
    from mambaprune.__main__ import main

    factory, shape = "cli_factories:vim_feature_dict", ["--input-shape", "3,32,32"]
    target = tmp_path / "features.pt2"
    assert main(["compile", factory, "--ratio", "0.3", "-o", str(target), *shape]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    loaded = torch.export.load(str(target)).module()
    import cli_factories

    model = cli_factories.vim_feature_dict().eval()
    x = torch.randn(2, 3, 32, 32)
    got, dense = loaded(x), run(model, x)
    assert list(got) == list(dense) == ["block1", "block4", "final"]
    assert all(got[k].shape == dense[k].shape for k in dense)
