"""A zoo of published vision-SSM code outside the four families the compiler was taught (ViM,
PlainMamba, VMamba, MambaVision): each family's computation reproduced in our own test code, in its
authors' style and with their module names, at tiny sizes (tests/test_official_zoo.py,
benchmarks/support_table.py).

Every family module exposes `tiny()` (a small model of the released structure, with an `img_size`
attribute), `PAPER` and `REPO`. They import `mamba_ssm` and the compiled CUDA extensions by name, as
their authors' code does: import them only inside `installed()`, which puts the stand-ins
(tests/mamba_ssm_stub.py, cuda_extensions.py) in sys.modules.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# family module -> the name used in tables
FAMILIES = {
    "localmamba": "LocalVim (LocalMamba)",
    "videomamba": "VideoMamba, image models",
    "mambar": "Mamba-R (Vision Mamba with registers)",
    "mamba_nd": "Mamba-ND (2-D)",
    "groupmamba": "GroupMamba",
    "simba": "SiMBA",
    "efficientvmamba": "EfficientVMamba",
    "medmamba": "MedMamba",
    "vssd": "VSSD (Mamba-2, non-causal SSD)",
    "efficientvim": "EfficientViM (Mamba-2, hidden-state mixer SSD)",
    "hf_mamba": "Mamba in transformers (slow path: a Python token loop)",
    "vmunet": "VM-UNet (segmentation U-Net)",
}


@contextlib.contextmanager
def installed():
    """The stand-ins of mamba_ssm and the CUDA extensions in sys.modules, tests/ and this folder importable."""
    for path in (TESTS, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)
    import cuda_extensions
    import mamba_ssm_stub
    with mamba_ssm_stub.installed(), cuda_extensions.installed():
        yield


def family(name: str):
    """The family's module (call inside `installed()`)."""
    return importlib.import_module(f"{__name__}.{name}")
