"""A Triton Inference Server model repository for a pruned model (the python backend).

    folder/
      NAME/
        config.pbtxt        max_batch_size, dynamic_batching, instance_group (KIND_CPU or KIND_GPU),
                            INPUT__i / OUTPUT__i with their dtypes and dims (batch excluded)
        1/
          model.pt2         torch.export.save of the pruned program, dynamic batch (PrunedModel.export)
          model.py          mambaprune/deployment/triton/python_model.py: loads model.pt2, runs it

The python backend is the path because it is the one backend the `nvidia-pytriton` wheel ships
(tritonserver 2.51 with backends/python only: no pytorch / torch_aoti backend). The serving Python
environment needs torch and mambaprune (model.py imports ``mambaprune.runtime`` to register our
custom ops before ``torch.export.load``); the ``python_path`` parameter prepends folders to its
``sys.path``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ...api.pruned_model import PrunedModel
from ...errors import BatchSizeError, InvalidArgumentError, InvalidArgumentTypeError

TRITON_DTYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16",
                 torch.float64: "TYPE_FP64", torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32",
                 torch.int8: "TYPE_INT8", torch.uint8: "TYPE_UINT8", torch.bool: "TYPE_BOOL"}
PROGRAM_FILE = "model.pt2"
MODEL_FILE = "model.py"
VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model: its Triton name, dtype and dims without the batch."""
    name: str
    dtype: torch.dtype
    dims: tuple

    def config(self) -> str:
        return (f'  {{ name: "{self.name}" data_type: {TRITON_DTYPES[self.dtype]} '
                f'dims: [ {", ".join(map(str, self.dims))} ] }}')


def input_specs(pruned: PrunedModel) -> list:
    specs = []
    for i, spec in enumerate(pruned._input_spec):
        if spec is None:
            raise InvalidArgumentError("a Triton model takes tensors only; this pruned model was compiled with a "
                                       f"non-tensor input at position {i}: compile it with tensor inputs only")
        shape, dtype, _ = spec
        specs.append(TensorSpec(f"INPUT__{i}", _servable(dtype, f"input {i}"), tuple(shape)))
    return specs


@torch.no_grad()
def output_specs(pruned: PrunedModel) -> list:
    """The outputs' dtypes and dims, read from a run at batch 2 (every output must follow the batch)."""
    from ..export import example_inputs_for

    outputs = torch.utils._pytree.tree_leaves(pruned(*example_inputs_for(pruned._input_spec, 2)))
    specs = []
    for i, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2:
            raise InvalidArgumentError(f"output {i} of the pruned model does not have the batch as its first "
                                       "dimension: Triton batches along the first dimension of every output")
        specs.append(TensorSpec(f"OUTPUT__{i}", _servable(out.dtype, f"output {i}"), tuple(out.shape[1:])))
    return specs


def _servable(dtype: torch.dtype, what: str) -> torch.dtype:
    if dtype not in TRITON_DTYPES:
        raise InvalidArgumentError(f"{what} has dtype {dtype}, which the Triton repository writer does not map; "
                                   f"supported: {', '.join(map(str, TRITON_DTYPES))}")
    return dtype


def config_text(name: str, inputs: list, outputs: list, max_batch_size: int, instances: int,
                max_queue_delay_us: int, kind: str = "KIND_CPU", parameters: dict | None = None) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(s.config() for s in inputs), "]",
             "output [", ",\n".join(s.config() for s in outputs), "]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
             f"instance_group [ {{ kind: {kind} count: {instances} }} ]"]
    for key, value in (parameters or {}).items():   # JSON string escapes are protobuf text-format escapes
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(str(value))} }} }}')
    return "\n".join(lines) + "\n"


def write_model_repository(pruned: PrunedModel, folder, name: str = "mambaprune", max_batch_size: int = 8,
                           instances: int = 1, max_queue_delay_us: int = 500, threads: int | None = None,
                           python_path: tuple = ()) -> Path:
    """Write `pruned` as the model `name` of the Triton model repository `folder`; returns folder/name.

    max_batch_size: the largest batch Triton forms (dynamic batching joins requests up to it);
    instances: model instances (each one a python backend process holding the program);
    max_queue_delay_us: how long a request may wait for others to join its batch;
    threads: torch intra-op threads of each instance (None: torch's default);
    python_path: folders prepended to the serving interpreter's sys.path (where mambaprune lives
    if it is not installed there). The model is written to a temporary folder beside folder/name and
    renamed into place: an existing folder/name is replaced only by a complete new one (a failed
    write leaves it as it was). Also ``pruned.export(folder, format="triton", name=..., ...)``.
    """
    if not isinstance(pruned, PrunedModel):
        raise InvalidArgumentTypeError(f"write_model_repository takes a PrunedModel (compile_pruned's result); got "
                                       f"{type(pruned).__name__}")
    _check_name(name)
    if pruned.static_batch is not None:
        raise BatchSizeError(f"this pruned model runs only batches of {pruned.static_batch} (torch.export fixed the "
                             "batch of the model's code), and Triton's dynamic batching needs any batch: serve a model "
                             "captured with a dynamic batch")
    for label, value, least in (("max_batch_size", max_batch_size, 1), ("instances", instances, 1),
                                ("max_queue_delay_us", max_queue_delay_us, 0), ("threads", threads or 1, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(f"{label} must be an int >= {least}; got {value!r}")
    device = pruned._input_spec[0][2] if pruned._input_spec and pruned._input_spec[0] else torch.device("cpu")
    parameters = {"python_path": ":".join(str(Path(p).resolve()) for p in python_path)} if python_path else {}
    if threads is not None:
        parameters["intra_op_threads"] = threads
    parameters["device"] = device.type
    config = config_text(name, input_specs(pruned), output_specs(pruned), max_batch_size, instances,
                         max_queue_delay_us, "KIND_GPU" if device.type == "cuda" else "KIND_CPU", parameters)
    model_dir = Path(folder) / name
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=model_dir.parent))
    try:
        (staging / VERSION).mkdir()
        pruned.export(staging / VERSION / PROGRAM_FILE)
        shutil.copyfile(Path(__file__).with_name("python_model.py"), staging / VERSION / MODEL_FILE)
        (staging / "config.pbtxt").write_text(config)
        os.chmod(staging, 0o777 & ~_umask())
        replace_folder(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`: an existing `target` is moved aside first and removed
    only once `new` is in place (a failure in between puts it back), so `target` is never half written."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(aside)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name) or name[0] == ".":
        raise InvalidArgumentError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder "
                                   "and the URL /v2/models/NAME)")
