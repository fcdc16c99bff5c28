"""model.py of a mambaprune Triton model (python backend): runs the pruned program in model.pt2.

Copied into every repository that `write_model_repository` writes; it runs inside Triton's python
backend stub, where ``triton_python_backend_utils`` exists. Dynamic batching hands `execute` several
requests at once: their inputs are joined along the batch, the program runs once, and the outputs
are split back per request. Tensors cross the stub by DLPack, not numpy: the 2.51 stub of the
nvidia-pytriton wheel (built for numpy 1) sends empty outputs for numpy 2 arrays.
"""
import json
import os
import sys


def parameters_of(model_config: dict) -> dict:
    """config.pbtxt's parameters as {key: string}."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def split_sizes(batches: list) -> list:
    """[batch of each request] -> [(start, stop)] in the joined batch."""
    bounds, start = [], 0
    for size in batches:
        bounds.append((start, start + size))
        start += size
    return bounds


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters_of(config)
        for folder in reversed([p for p in params.get("python_path", "").split(":") if p]):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        import torch

        import mambaprune.runtime  # noqa: F401  registers the mambaprune:: ops before the program loads
        from mambaprune.deployment.triton.repository import TRITON_DTYPES

        if params.get("intra_op_threads"):
            torch.set_num_threads(int(params["intra_op_threads"]))
        self.device = torch.device(params.get("device", "cpu"))
        if self.device.type == "cuda" and args.get("model_instance_device_id"):
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt2")
        self.module = torch.export.load(path).module().to(self.device)
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.torch = torch
        with torch.inference_mode():  # the first run loads kernels: done before the model reports ready
            dtypes = {name: dtype for dtype, name in TRITON_DTYPES.items()}
            self.module(*[torch.zeros(1, *map(int, tensor["dims"]), dtype=dtypes[tensor["data_type"]], device=self.device)
                          for tensor in config["input"]])

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        torch = self.torch
        columns = [[torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for r in requests]
                   for name in self.inputs]
        try:
            with torch.inference_mode():
                joined = [torch.cat(column).to(self.device) for column in columns]
                outputs = torch.utils._pytree.tree_leaves(self.module(*joined))
        except Exception as err:  # reported to every client of this batch, the server keeps running
            error = pb_utils.TritonError(f"{type(err).__name__}: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        for start, stop in split_sizes([len(x) for x in columns[0]]):
            tensors = [pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(out[start:stop].cpu().contiguous()))
                       for name, out in zip(self.outputs, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
