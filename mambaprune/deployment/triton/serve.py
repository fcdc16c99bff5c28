"""serve(): prune (or take a pruned model), write a model repository, start tritonserver on it."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ...api.compile import compile_pruned
from ...api.pruned_model import PrunedModel
from ...errors import InvalidArgumentError, InvalidArgumentTypeError
from .repository import write_model_repository
from .server import TritonServer, start_tritonserver

DEFAULT_RATIO = 0.3
PACKAGE_ROOT = Path(__file__).resolve().parents[3]   # the folder holding this mambaprune: the server imports it


def serve(model, ratio: float | None = None, host: str = "127.0.0.1", http_port: int = 8000,
          metrics_port: int | None = 8002, name: str = "mambaprune", max_batch_size: int = 8, instances: int = 1,
          max_queue_delay_us: int = 500, threads: int | None = None, example_inputs: tuple | None = None,
          timeout: float = 180.0, **compile_options) -> TritonServer:
    """Serve a pruned model with NVIDIA Triton Inference Server; returns the running server.

        >>> with serve(create_model("vim_t"), ratio=0.3, http_port=0) as server:
        ...     client = http_client(server.url)           # POST {server.url}/v2/models/mambaprune/infer

    model: a PrunedModel (served as it is) or an nn.Module (compile_pruned(model, ratio, ...) first:
    ratio defaults to 0.3; example_inputs and compile_options go to compile_pruned).
    host: loopback by default; http_port / metrics_port: 0 picks a free port, metrics_port=None turns
    metrics off. max_batch_size, instances, max_queue_delay_us, threads: see write_model_repository.
    The server runs until `.stop()` (or the end of a `with` block, or of this process).
    """
    pruned = _pruned(model, ratio, example_inputs, compile_options)
    workdir = Path(tempfile.mkdtemp(prefix="mambaprune_triton_"))
    try:
        repository = workdir / "models"
        repository.mkdir()
        write_model_repository(pruned, repository, name, max_batch_size=max_batch_size, instances=instances,
                               max_queue_delay_us=max_queue_delay_us, threads=threads,
                               python_path=(PACKAGE_ROOT,))
        return start_tritonserver(repository, name, host=host, http_port=http_port, metrics_port=metrics_port,
                                  timeout=timeout, workdir=workdir, owns_workdir=True)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _pruned(model, ratio, example_inputs, compile_options) -> PrunedModel:
    if isinstance(model, PrunedModel):
        if ratio is not None or example_inputs is not None or compile_options:
            raise InvalidArgumentError("serve() got a PrunedModel, which is already compiled: leave out ratio, "
                                       "example_inputs and compile options (or pass the original nn.Module)")
        return model
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentTypeError(f"serve() takes an nn.Module or a PrunedModel; got {type(model).__name__}")
    return compile_pruned(model, ratio=DEFAULT_RATIO if ratio is None else ratio,
                          example_inputs=example_inputs, **compile_options)
