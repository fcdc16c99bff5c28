"""Serving a pruned model with NVIDIA Triton Inference Server (the python backend of tritonserver).

    >>> from mambaprune.deployment.triton import serve, http_client, infer
    >>> with serve(model, ratio=0.3, http_port=0) as server:          # 127.0.0.1, a free port
    ...     [logits] = infer(http_client(server.url), server.model_name, images.numpy())

`write_model_repository(pruned, folder, name)` writes the model repository alone (config.pbtxt,
1/model.pt2, 1/model.py) for a Triton deployment of your own; `serve` writes one and starts the
`tritonserver` binary of the `nvidia-pytriton` wheel on it (server.py says why its environment is set
as it is).
"""
from .client import http_client, infer
from .repository import write_model_repository
from .serve import serve
from .server import TritonServer, find_tritonserver, start_tritonserver

__all__ = ["serve", "write_model_repository", "start_tritonserver", "find_tritonserver", "TritonServer",
           "http_client", "infer"]
