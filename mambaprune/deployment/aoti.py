"""AOTInductor packages: ``export(path, format="aoti")``.

The pruned program is re-exported with a dynamic batch (export.reexport) and compiled ahead of time
by ``torch._inductor.aoti_compile_and_package`` into one ``.pt2`` package: inductor's generated C++
for everything between our custom ops, and a call through the dispatcher for every
``mambaprune::`` op (the selective scan, the position-aware convs, the path orders). Loading needs
no compiler and no mambaprune compiler code, only the ops registered in the process::

    import torch, mambaprune.runtime.op_library   # the mambaprune:: ops and their C++ CPU kernels
    model = torch._inductor.aoti_load_package("model.pt2")
    y = model(images)                              # any batch size

Options: ``inductor_configs=`` (a dict, as aoti_compile_and_package takes it).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..runtime.torch_logs import torch_logs_held
from .export import reexport, register_format


def write_aoti(pruned, tmp: str, path: str, inductor_configs: Optional[dict] = None) -> None:
    """Compile the re-exported program with AOTInductor into the package file `tmp` (a .pt2 name)."""
    program = reexport(pruned)
    with torch.no_grad(), torch_logs_held(), open(tmp, "wb") as file:   # a file object: the archive's
        torch._inductor.aoti_compile_and_package(program, package_path=file,  # folder is not named after tmp
                                                 inductor_configs=dict(inductor_configs or {}))


def load_aoti(path, run_single_threaded: bool = False):
    """``torch._inductor.aoti_load_package`` with the mambaprune ops registered first."""
    from ..runtime import op_library  # noqa: F401  the ops the package calls
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded)


register_format("aoti", (), write_aoti, accepts=(".pt2",))
