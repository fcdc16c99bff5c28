"""Serving with a real NVIDIA Triton Inference Server (tritonserver 2.51 of the nvidia-pytriton wheel).

The server runs on 127.0.0.1 only, on free ports; every request goes there, with a bounded count and
a timeout; the fixture stops the server whatever happens. Skipped, with the reason, when
nvidia-pytriton or tritonclient is not installed. The repository writer's tests need no server.
"""
import concurrent.futures
import copy
import json
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from mambaprune import compile_pruned, create_model
from mambaprune.__main__ import main
from mambaprune.deployment.triton import write_model_repository
from mambaprune.deployment.triton.python_model import parameters_of, split_sizes
from mambaprune.errors import BatchSizeError, InvalidArgumentError, MissingDependencyError, ServerError

sys.path.insert(0, str(Path(__file__).parent))  # cli_factories is importable as a module

HOST = "127.0.0.1"
TIMEOUT = 60


def tritonserver_missing() -> str:
    try:
        import tritonclient.http  # noqa: F401
        from mambaprune.deployment.triton import find_tritonserver
        find_tritonserver()
    except (ImportError, MissingDependencyError) as err:
        return f"Triton Inference Server is not installed here ({err}): pip install 'mambaprune[serve]'"
    return ""


needs_server = pytest.mark.skipif(bool(tritonserver_missing()), reason=tritonserver_missing() or "installed")


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10).eval()
    return compile_pruned(model, ratio=0.3)


@pytest.fixture(scope="module")
def server(pruned):
    from mambaprune.deployment.triton import serve

    handle = serve(pruned, host=HOST, http_port=0, metrics_port=0, name="tiny_vim", max_batch_size=4, threads=1,
                   max_queue_delay_us=20000, timeout=150)
    try:
        yield handle
    finally:
        handle.stop()


def get(url: str):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.status, response.read().decode()


def test_repository_holds_a_config_and_a_program_equal_to_the_pruned_model(pruned, tmp_path):
    folder = write_model_repository(pruned, tmp_path, "vim", max_batch_size=6, instances=2, max_queue_delay_us=300,
                                    threads=1)
    config = (folder / "config.pbtxt").read_text()
    for line in ('name: "vim"', 'backend: "python"', "max_batch_size: 6",
                 '{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }',
                 '{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] }',
                 "dynamic_batching { max_queue_delay_microseconds: 300 }",
                 "instance_group [ { kind: KIND_CPU count: 2 } ]",
                 'parameters { key: "intra_op_threads" value: { string_value: "1" } }'):
        assert line in config
    assert (folder / "1" / "model.py").read_text() == (Path(write_model_repository.__code__.co_filename)
                                                      .with_name("python_model.py").read_text())
    program = torch.export.load(str(folder / "1" / "model.pt2")).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program(x), pruned(x), atol=1e-5, rtol=0)


def test_repository_arguments_are_checked(pruned, tmp_path):
    with pytest.raises(InvalidArgumentError, match="model name"):
        write_model_repository(pruned, tmp_path, "a/b")
    with pytest.raises(InvalidArgumentError, match="max_batch_size must be an int >= 1"):
        write_model_repository(pruned, tmp_path, "vim", max_batch_size=0)
    with pytest.raises(TypeError, match="PrunedModel"):
        write_model_repository(torch.nn.Linear(2, 2), tmp_path, "vim")
    fixed = copy.copy(pruned)
    fixed.static_batch = 2   # as a model whose code fixes the batch under torch.export (MambaVision)
    with pytest.raises(BatchSizeError, match="runs only batches of 2"):
        write_model_repository(fixed, tmp_path, "vim")
    assert not any(tmp_path.iterdir())


def test_export_format_triton_writes_the_repository_and_replaces_it_whole(pruned, tmp_path, monkeypatch):
    import mambaprune.deployment.triton.repository as repository

    repo = tmp_path / "models"
    assert pruned.export(repo, format="triton", name="vim", max_batch_size=3) == str(repo)
    assert "max_batch_size: 3" in (repo / "vim" / "config.pbtxt").read_text()
    before = (repo / "vim" / "config.pbtxt").read_text()

    def broken_copy(*args):
        raise OSError("disk full")
    monkeypatch.setattr(repository.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        pruned.export(repo, format="triton", name="vim", max_batch_size=5)
    assert (repo / "vim" / "config.pbtxt").read_text() == before      # the old model, whole
    assert sorted(p.name for p in repo.iterdir()) == ["vim"]            # no staging folder left
    monkeypatch.undo()
    pruned.export(repo, format="triton", name="vim", max_batch_size=5)
    assert "max_batch_size: 5" in (repo / "vim" / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["vim"]
    with pytest.raises(InvalidArgumentError, match="disagrees with the path"):
        pruned.export(tmp_path / "model.onnx", format="triton")


def test_the_compile_command_writes_a_triton_repository(tmp_path, capsys):
    repo = tmp_path / "models"
    assert main(["compile", "cli_factories:tiny_vim", "--ratio", "0.3", "-o", str(repo), "--format", "triton"]) == 0
    assert f"wrote {repo} (" in capsys.readouterr().out
    config = (repo / "mambaprune" / "config.pbtxt").read_text()
    assert 'name: "mambaprune"' in config and "dynamic_batching" in config
    assert (repo / "mambaprune" / "1" / "model.pt2").is_file()
    assert main(["compile", "cli_factories:tiny_vim", "-o", str(repo), "--format", "tritonn"]) == 2
    assert "unknown export format 'tritonn'" in capsys.readouterr().err


def test_requests_are_split_back_as_they_were_joined():
    assert split_sizes([1, 3, 2]) == [(0, 1), (1, 4), (4, 6)]
    assert parameters_of({"parameters": {"a": {"string_value": "1"}}}) == {"a": "1"}


@needs_server
def test_served_outputs_equal_the_pytorch_pruned_model(server, pruned):
    from mambaprune.deployment.triton import http_client, infer

    client = http_client(server.url, timeout=TIMEOUT)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        [served] = infer(client, server.model_name, x.numpy())
        with torch.no_grad():
            expected = pruned(x).numpy()
        assert served.shape == expected.shape
        assert np.abs(served - expected).max() <= 1e-5


@needs_server
def test_concurrent_requests_each_get_their_own_rows(server, pruned):
    """Dynamic batching may join these 6 requests (20 ms queue delay): each answer must still be its own."""
    from mambaprune.deployment.triton import http_client, infer

    inputs = [torch.randn(1 + i % 2, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(6)]

    def ask(x):
        return infer(http_client(server.url, timeout=TIMEOUT), server.model_name, x.numpy())[0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, inputs, timeout=TIMEOUT))
    with torch.no_grad():
        for x, served in zip(inputs, answers):
            assert np.abs(served - pruned(x).numpy()).max() <= 1e-5


@needs_server
def test_health_config_and_metrics(server):
    assert get(f"{server.url}/v2/health/live")[0] == 200
    assert get(f"{server.url}/v2/health/ready")[0] == 200
    assert get(f"{server.url}/v2/models/tiny_vim/ready")[0] == 200
    config = json.loads(get(f"{server.url}/v2/models/tiny_vim/config")[1])
    assert config["max_batch_size"] == 4 and config["backend"] == "python"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    status, text = get(server.metrics_url)
    assert status == 200 and 'nv_inference_request_success{model="tiny_vim",version="1"}' in text
    assert f"Started HTTPService at {HOST}:{server.http_port}" in server.log()
    assert f"Started Metrics Service at {HOST}:{server.metrics_port}" in server.log()


@needs_server
def test_a_port_in_use_is_a_server_error_quoting_the_log(tmp_path):
    from mambaprune.deployment.triton import start_tritonserver

    (tmp_path / "models").mkdir()
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        with pytest.raises(ServerError, match="exited with status") as info:
            start_tritonserver(tmp_path / "models", "none", host=HOST, http_port=taken.getsockname()[1],
                               metrics_port=None, timeout=60)
    assert "its errors and last lines" in str(info.value)


@needs_server
def test_the_command_serves_until_its_duration_and_stops(pruned, monkeypatch, capsys):
    """The compile step of the command is test_cli.py's: here it returns the module's pruned model."""
    import mambaprune.__main__ as cli

    monkeypatch.setattr(cli, "_compile", lambda args: (None, pruned))
    assert main(["serve", "tiny", "--http-port", "0", "--metrics-port", "0", "--threads", "1", "--duration", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    flops = f"{100 * pruned.report.achieved_ratio:.1f}"
    assert out[0].startswith(f"serving tiny (FLOPs -{flops}%) at http://127.0.0.1:") and "/v2/health/ready" in out[0]
    assert out[-1] == "stopped"


def test_serve_checks_its_arguments_before_starting_anything(pruned):
    from mambaprune.deployment.triton import serve

    with pytest.raises(InvalidArgumentError, match="already compiled: leave out ratio"):
        serve(pruned, ratio=0.3)
    with pytest.raises(TypeError, match="nn.Module or a PrunedModel"):
        serve("vim_t")


def test_a_bad_port_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "cli_factories:tiny_vim", "--http-port", "70000"])
    assert "expected a port number in [0, 65535]" in capsys.readouterr().err


def test_the_benchmark_summary_uses_nearest_rank_percentiles():
    from benchmark_modules import load_benchmark

    row = load_benchmark("serve_triton").summary([0.004, 0.001, 0.003, 0.002] + [0.010] * 96, images=200, seconds=4.0)
    assert row["images_per_s"] == 50.0 and row["requests"] == 100
    assert row["p50_ms"] == pytest.approx(10.0)           # the 50th of 100 sorted latencies
    assert row["p99_ms"] == pytest.approx(10.0)
    low = load_benchmark("serve_triton").summary([0.001 * k for k in range(1, 101)], images=100, seconds=1.0)
    assert (low["p50_ms"], low["p99_ms"]) == (pytest.approx(50.0), pytest.approx(99.0))
