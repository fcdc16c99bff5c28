"""PrunedModel.export (.pt2, .onnx, TensorRT) and the onnxruntime / tensorrt backends.

ONNX files are run with onnxruntime on the CPU at a batch size different from the export one (2).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import mambaprune
from mambaprune import compile_pruned
from mambaprune.api import PrunedModel
from mambaprune.errors import MissingDependencyError
from mambaprune.models import create_model
from mambaprune.deployment import export as export_module

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mambaprune.deployment.onnxruntime_backend import OnnxRuntimeModule, default_providers  # noqa: E402

VIM_TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32)
PLAIN_TINY = dict(img_size=64, depth=4, embed_dim=32)


def _model(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, **overrides).eval()


@pytest.fixture(scope="module")
def vim_pruned():
    return compile_pruned(_model("vim_t", **VIM_TINY), ratio=0.3)


@pytest.fixture(scope="module")
def plain_pruned():
    # depth 4 cannot reach ratio 0.3 (too few blocks after a site): an explicit schedule instead
    return compile_pruned(_model("plainmamba_l1", **PLAIN_TINY), schedule={1: 0.7, 2: 0.7})


def _inputs(pruned, batch, seed=1):
    shape = pruned._input_spec[0][0]
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _has_pruning_ops(pruned):
    targets = {getattr(n.target, "__name__", str(n.target)) for n in pruned.graph_module.graph.nodes}
    return "pos_conv1d" in targets or any("select_tokens" in t for t in targets)


# ----------------------------------------------------------------------------- format dispatch, paths


def test_unknown_suffix_and_format_list_the_formats(vim_pruned, tmp_path):
    with pytest.raises(ValueError, match="onnx.*pt2.*tensorrt"):
        vim_pruned.export(tmp_path / "model.xyz")
    with pytest.raises(ValueError, match="onnx.*pt2.*tensorrt"):
        vim_pruned.export(tmp_path / "model.onnx", format="tflite")
    assert not list(tmp_path.iterdir())


def test_missing_folder_is_a_clear_error(vim_pruned, tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(ValueError, match="does not exist") as info:
        vim_pruned.export(missing / "model.pt2")
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_failed_export_keeps_the_existing_file(vim_pruned, tmp_path, monkeypatch):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous good file")

    def broken_save(program, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half an archive")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        vim_pruned.export(target)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left behind


def test_atomic_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    assert export_module.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new")) == str(target)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ----------------------------------------------------------------------------- .pt2


@pytest.mark.parametrize("which", ["vim_pruned", "plain_pruned"])
def test_pt2_roundtrip(which, request, tmp_path):
    pruned = request.getfixturevalue(which)
    assert _has_pruning_ops(pruned)
    path = pruned.export(tmp_path / "model.pt2")
    assert path == str(tmp_path / "model.pt2")
    loaded = torch.export.load(path).module()
    for batch in (3, 1):  # export batch is 2
        x = _inputs(pruned, batch)
        with torch.no_grad():
            assert _max_diff(loaded(x), pruned(x)) <= 1e-5


# ----------------------------------------------------------------------------- .onnx


def _check_onnx_file(path, pruned, batches=(3, 1), tol=1e-4):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    first_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param and not first_dim.HasField("dim_value"), "batch axis must be dynamic"
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains in the ONNX graph: {domains}"
    session = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    for batch in batches:
        x = _inputs(pruned, batch)
        with torch.no_grad():
            assert _max_diff(session(x), pruned(x)) <= tol


def test_onnx_pruned_vim(vim_pruned, tmp_path):
    path = vim_pruned.export(tmp_path / "vim.onnx")
    _check_onnx_file(path, vim_pruned)


def test_onnx_pruned_plainmamba(plain_pruned, tmp_path):
    path = plain_pruned.export(str(tmp_path / "plain.onnx"))
    _check_onnx_file(path, plain_pruned)


def test_onnxruntime_backend_dense_model():
    model = _model("vim_t", **VIM_TINY)
    fast = compile_pruned(model, ratio=0.0, backend="onnxruntime")
    assert fast.backend == "onnxruntime" and not fast.report.sites
    assert fast._runner.providers[0] in ort.get_available_providers()
    x = _inputs(fast, 3)
    with torch.no_grad():
        expected = model(x)
    got = fast(x)
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape
    assert _max_diff(got, expected) <= 1e-4


def test_default_providers_cpu_last():
    providers = default_providers()
    assert providers and set(providers) <= set(ort.get_available_providers())
    if "CUDAExecutionProvider" in providers:
        assert providers[0] == "CUDAExecutionProvider"


# ----------------------------------------------------------------------------- op-level translations


class _ScanModule(torch.nn.Module):
    """Every optional argument of the scan: grouped B/C, D, z, delta_bias, softplus, gap."""

    def __init__(self, grouped: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dim, self.state, self.groups = 8, 4, 2 if grouped else None
        self.A = torch.nn.Parameter(-torch.rand(self.dim, self.state, generator=g) - 0.2)
        self.D = torch.nn.Parameter(torch.randn(self.dim, generator=g))
        self.delta_bias = torch.nn.Parameter(torch.randn(self.dim, generator=g) * 0.1)

    def forward(self, u, delta, B, C, z, gap):
        return mambaprune.selective_scan(u, delta, self.A, B, C, self.D, z, self.delta_bias, True, gap)


@pytest.mark.parametrize("scan_form", ["scan", "doubling"])
@pytest.mark.parametrize("grouped", [False, True])
def test_selective_scan_translation(scan_form, grouped, tmp_path):
    from mambaprune.deployment.onnx_ops import custom_translation_table
    module = _ScanModule(grouped)
    length = 37  # not a power of two: exercises the last doubling round

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        bc = (batch, 2, 4, length) if grouped else (batch, 4, length)
        return (torch.randn(batch, 8, length, generator=g), torch.randn(batch, 8, length, generator=g),
                torch.randn(*bc, generator=g), torch.randn(*bc, generator=g),
                torch.randn(batch, 8, length, generator=g),
                torch.randint(1, 4, (batch, length), generator=g).float())

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, inputs(2, 0), dynamic_shapes=tuple({0: batch} for _ in range(6)))
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=custom_translation_table(scan_form),
                                     opset_version=18)
    path = str(tmp_path / "scan.onnx")
    onnx_program.save(path, external_data=False)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ("Scan" in ops) == (scan_form == "scan")
    session = OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    x = inputs(5, 1)
    with torch.no_grad():
        assert _max_diff(session(*x), module(*x)) <= 1e-4


def test_scan_form_is_validated():
    from mambaprune.deployment.onnx_ops import custom_translation_table
    with pytest.raises(ValueError, match="scan_form"):
        custom_translation_table("unrolled-by-hand")


# ----------------------------------------------------------------------------- missing dependencies


def test_missing_onnx_dependency_is_named(vim_pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    with pytest.raises(MissingDependencyError, match="onnxscript"):
        vim_pruned.export(tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_backend_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        default_providers()


def test_missing_torch_tensorrt_is_a_clear_error(vim_pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    for target in ("model.engine", "model.ts"):
        with pytest.raises(MissingDependencyError, match="torch-tensorrt") as info:
            vim_pruned.export(tmp_path / target)
        assert "pip install 'mambaprune[tensorrt]'" in str(info.value)
    with pytest.raises(MissingDependencyError, match="torch-tensorrt"):
        PrunedModel(vim_pruned.graph_module, vim_pruned.report, (_inputs(vim_pruned, 1),), "tensorrt")
    assert not list(tmp_path.iterdir())


def test_unknown_backend_lists_the_backends():
    with pytest.raises(ValueError, match="onnxruntime.*tensorrt"):
        compile_pruned(_model("vim_t", **VIM_TINY), ratio=0.0, backend="tvm")


# ----------------------------------------------------------------------------- TensorRT (where it imports)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_backend_and_export(tmp_path):
    pytest.importorskip("torch_tensorrt")
    model = _model("vim_t", **VIM_TINY).cuda()
    example = (torch.randn(2, 3, 32, 32, device="cuda"),)
    fast = compile_pruned(model, ratio=0.3, example_inputs=example, backend="tensorrt")
    eager = compile_pruned(model, ratio=0.3, example_inputs=example)
    x = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert _max_diff(fast(x), eager(x)) <= 1e-3
    path = eager.export(tmp_path / "vim.engine", max_batch=8)
    assert os.path.getsize(path) > 0
