"""export(format="aoti"): an AOTInductor package with a dynamic batch, loaded in a fresh process that
imports only mambaprune's op library (no compiler), equal to the pruned model at batches 1 and 3.

One tiny ViM and one tiny PlainMamba (each package is compiled once: about a minute on one core; the
PlainMamba's is in the long tier, `--long`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from mambaprune import compile_pruned, create_model
from mambaprune.deployment.export import resolve_format

BATCHES = (1, 3)

LOADER = textwrap.dedent("""
    import sys, torch
    import mambaprune.runtime.op_library            # the ops and their CPU kernels, nothing else
    package = torch._inductor.aoti_load_package(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        outputs = [package(x) for x in inputs]
    torch.save(outputs, sys.argv[3])
    compiler = sorted(m for m in sys.modules if m.startswith(("mambaprune.api", "mambaprune.capture",
                                                              "mambaprune.deployment")))
    print("LOADED", __import__("json").dumps(compiler))
""")

MODELS = {
    "vim": dict(name="vim_t", img_size=32, depth=4, embed_dim=32, schedule={2: 0.5}),
    "plainmamba": dict(name="plainmamba_l1", img_size=64, depth=3, embed_dim=32, d_state=4, schedule={1: 0.6}),
}


@pytest.fixture(scope="module", params=[pytest.param("plainmamba", marks=pytest.mark.long), "vim"])
def exported(request, tmp_path_factory):
    spec = dict(MODELS[request.param])
    name, size, schedule = spec.pop("name"), spec["img_size"], spec.pop("schedule")
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **spec).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = compile_pruned(model, example_inputs=(torch.randn(2, 3, size, size),), schedule=schedule)
    folder = tmp_path_factory.mktemp(request.param)
    path = pruned.export(folder / "model.pt2", format="aoti")
    inputs = [torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)) for b in BATCHES]
    torch.save(inputs, folder / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(path), str(folder / "inputs.pt"), str(folder / "out.pt")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded_modules = json.loads(run.stdout.split("LOADED", 1)[1])
    return model, before, pruned, inputs, torch.load(folder / "out.pt"), loaded_modules, path


def test_the_package_equals_the_pruned_model_at_every_batch(exported):
    _, _, pruned, inputs, outputs, _, _ = exported
    assert pruned.report.sites
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            assert y.shape == (x.shape[0], 10)
            assert (y - pruned(x)).abs().max().item() <= 1e-5


def test_loading_needs_only_the_op_library_and_the_model_is_untouched(exported):
    model, before, _, _, _, loaded_modules, _ = exported
    assert loaded_modules == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_package_calls_our_ops_through_the_dispatcher(exported):
    """The scan is not decomposed into inductor code: the package's extern calls name our op."""
    with zipfile.ZipFile(exported[-1]) as package:
        calls = "".join(package.read(n).decode(errors="ignore") for n in package.namelist() if n.endswith("wrapper.json"))
    assert "mambaprune::selective_scan" in calls


def test_aoti_is_chosen_by_name_and_a_plain_pt2_stays_torch_export():
    assert resolve_format("model.pt2", None) == "pt2"
    assert resolve_format("model.pt2", "aoti") == "aoti"
    with pytest.raises(Exception, match="disagrees with the path"):
        resolve_format("model.onnx", "aoti")
