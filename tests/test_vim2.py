"""The reference vision Mamba-2 (models/vim2.py): builds, prunes like ViM, exports (.pt2, ONNX)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambaprune import compile_pruned
from mambaprune.api.compile import prepare
from mambaprune.models import create_model
from mambaprune.models.vim2 import BiMamba2
from mambaprune.runtime import ssd_scan_reference

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=8, headdim=16, num_classes=7)


def tiny(**overrides):
    torch.manual_seed(0)
    return create_model("vim2_t", **{**TINY, **overrides}).eval()


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pruned():
    return compile_pruned(tiny(), schedule={1: 0.7, 2: 0.7})


@pytest.mark.parametrize("name, width, heads", [("vim2_t", 192, 6), ("vim2_s", 384, 12)])
def test_published_shapes(name, width, heads):
    model = create_model(name, img_size=64, depth=2)   # 16 patches; the published depth is 24
    assert model.embed_dim == width and model.layers[0].mixer.nheads == heads
    assert model.token_position == 8 and model.pos_embed.shape == (1, 17, width)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert len(create_model(name, img_size=64).layers) == 24


def test_mixer_is_the_bidirectional_ssd_written_out():
    """The mixer against its definition with the scan as a direct token loop (runtime.ssd_scan_reference)."""
    torch.manual_seed(2)
    mixer = BiMamba2(16, d_state=4, headdim=8, ngroups=2).eval()
    u = torch.randn(2, 9, 16)
    E, G, N, H, P = mixer.d_inner, 2, 4, mixer.nheads, 8
    z, xbc, dt = torch.split(mixer.in_proj(u), [E, E + 2 * G * N, H], dim=-1)

    def direction(xbc, dt, conv, dt_bias, A_log, D):
        xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=xbc.shape[-1]))
        x, B, C = torch.split(xbc.transpose(1, 2), [E, G * N, G * N], dim=-1)
        return ssd_scan_reference(x.reshape(2, 9, H, P), dt, -torch.exp(A_log), B.reshape(2, 9, G, N),
                                  C.reshape(2, 9, G, N), D, dt_bias=dt_bias, dt_softplus=True).reshape(2, 9, E)

    y = (direction(xbc, dt, mixer.conv1d, mixer.dt_bias, mixer.A_log, mixer.D)
         + direction(xbc.flip(1), dt.flip(1), mixer.conv1d_b, mixer.dt_bias_b, mixer.A_b_log, mixer.D_b).flip(1)) / 2
    gated = y * F.silu(z)
    expected = mixer.out_proj(gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight)
    with torch.no_grad():
        assert torch.allclose(mixer(u), expected, atol=1e-5, rtol=1e-4)


def test_every_mixer_is_one_block_of_two_ssd_scans():
    prepared = prepare(tiny())
    scans = [n for n in prepared.captured.gm.graph.nodes if n.target == torch.ops.mambaprune.ssd_scan.default]
    assert len(scans) == 8
    assert [b.name for b in prepared.analysis.blocks] == [f"layers.{i}.mixer" for i in range(4)]
    assert all(b.mixing == "2 scans (identity, flip) + conv1d" for b in prepared.analysis.blocks)


def test_ratio_0_and_keep_all_are_the_model_and_a_pruned_model_prunes(pruned):
    model, x = tiny(), images(3)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(compile_pruned(model, ratio=0.0)(x), expected)
        assert torch.allclose(compile_pruned(model, schedule={1: 1.0, 2: 1.0})(x), expected, atol=1e-5)
        out = pruned(x)
    report = pruned.report
    assert [b.tokens for b in report.blocks] == [17, 12, 9, 9]
    assert 0.1 < report.achieved_ratio < 0.5
    assert "masked dense run" in str(report)   # checked against the dense graph with pruned tokens masked
    assert out.shape == (3, 7) and not torch.allclose(out, expected, atol=1e-3)


def test_compile_pruned_0_3_on_a_12_block_model():
    model = create_model("vim2_t", img_size=64, patch_size=8, embed_dim=32, depth=12, d_state=8, headdim=16,
                         num_classes=10).eval()
    fast = compile_pruned(model, ratio=0.3)
    assert abs(fast.report.achieved_ratio - 0.3) <= 0.02
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = fast(x)
        assert torch.allclose(together, torch.cat([fast(x[:1]), fast(x[1:])]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alignment", ["decay", "none"])
def test_other_alignments_build(alignment):
    model, x = tiny(), images(2)
    with torch.no_grad():
        out = compile_pruned(model, schedule={1: 0.7, 2: 0.7}, alignment=alignment)(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_pt2_round_trip(pruned, tmp_path):
    loaded = torch.export.load(pruned.export(tmp_path / "vim2.pt2")).module()
    for batch in (3, 1):
        x = images(batch, seed=batch)
        with torch.no_grad():
            assert torch.allclose(loaded(x), pruned(x), atol=1e-5, rtol=1e-5)


def test_onnx_round_trip_with_onnxruntime(pruned, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mambaprune.deployment.onnxruntime_backend import OnnxRuntimeModule

    path = pruned.export(tmp_path / "vim2.onnx")
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    session = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    for batch in (3, 1):
        x = images(batch, seed=batch)
        with torch.no_grad():
            assert torch.allclose(session(x), pruned(x), atol=1e-4, rtol=1e-4)
