"""compile_pruned from several threads at once: every result equals the one built alone, and the
process-wide switches torch.export flips (mkldnn, nnpack, cudnn) are as they were; a pruned model
served from another thread meanwhile keeps answering (equal up to float noise: mkldnn is off for the
whole process while torch.export traces).

Before the compile lock (pass_infra.COMPILE_LOCK) two threads compiling at once failed every time
(12 of 12 tries: "Trying to pop empty mode stack", a fake tensor in the exported constants, ...) and
left mkldnn / nnpack / cudnn switched off for the whole process.
"""
import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from golden_zoo import LoopVim  # noqa: E402
from loop_scans import loop_scan, loop_scan_adapter  # noqa: E402

import mambaprune  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.pass_infra import backend_switches  # noqa: E402

SCHEDULE = {2: 0.6}   # one site after block 2: every model below prunes there


def tiny(name):
    torch.manual_seed(0)
    if name == "loop":
        return LoopVim(depth=3).eval()
    config = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
    return create_model({"vim": "vim_t", "plainmamba": "plainmamba_l1"}[name], **config).eval()


def process_state() -> dict:
    return {**backend_switches(), "grad": torch.is_grad_enabled(), "dtype": torch.get_default_dtype(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "threads": torch.get_num_threads(),
            "inference_mode": torch.is_inference_mode_enabled()}


@pytest.fixture(scope="module")
def registered():
    mambaprune.register_scan(loop_scan, loop_scan_adapter)
    yield
    mambaprune.unregister_scan(loop_scan)


def result(pruned, x) -> tuple:
    with torch.no_grad():
        return pruned(x), pruned.kept_positions(x)


def test_concurrent_compiles_equal_sequential_ones_beside_an_inference_thread(registered):
    names = ["vim", "plainmamba", "loop", "vim"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    models = {name: tiny(name) for name in set(names)}
    alone = {name: mambaprune.compile_pruned(model, 0.3, schedule=SCHEDULE) for name, model in models.items()}
    served = alone["vim"]
    alone = {name: result(pruned, x) for name, pruned in alone.items()}
    with torch.no_grad():
        dense_before = models["plainmamba"](x)
    state = process_state()

    built, errors, served_outputs = {}, [], []
    start, done = threading.Barrier(len(names) + 1), threading.Event()

    def compile_one(i, name):
        start.wait()
        try:
            built[i] = result(mambaprune.compile_pruned(models[name], 0.3, schedule=SCHEDULE), x)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(err).__name__}: {err}")

    def serve():
        start.wait()
        with torch.no_grad():
            while not done.is_set() or not served_outputs:
                served_outputs.append(served(x))

    threads = [threading.Thread(target=compile_one, args=(i, name)) for i, name in enumerate(names)]
    server = threading.Thread(target=serve)
    for thread in threads + [server]:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    done.set()
    server.join(timeout=60)

    assert not errors, errors
    assert process_state() == state
    for i, name in enumerate(names):
        outputs, kept = built[i]
        torch.testing.assert_close(outputs, alone[name][0], rtol=0, atol=1e-6)
        assert kept.keys() == alone[name][1].keys()
        assert all(torch.equal(kept[site], alone[name][1][site]) for site in kept), name
    # equal up to float noise only: while torch.export traces, mkldnn is off for the whole process
    # (torch/export/_trace.py), so a convolution run meanwhile takes another kernel
    assert served_outputs
    for y in served_outputs:
        torch.testing.assert_close(y, alone["vim"][0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(models["plainmamba"](x), dense_before)   # the user's model, mkldnn on


def test_a_failed_capture_restores_the_switches_and_releases_the_lock():
    from mambaprune.pass_infra import COMPILE_LOCK

    class Unexportable(torch.nn.Module):
        img_size = 8

        def forward(self, x):
            torch.backends.mkldnn.set_flags(False)      # what a concurrent export used to leave behind
            raise RuntimeError("not exportable")

    state = process_state()
    with pytest.raises(mambaprune.UnsupportedModelError, match="torch.export could not capture"):
        mambaprune.compile_pruned(Unexportable(), 0.3, (torch.randn(1, 3, 8, 8),))
    assert process_state() == state
    free = []

    def try_lock():          # from another thread: the lock is re-entrant for this one
        if COMPILE_LOCK.acquire(blocking=False):
            free.append(True)
            COMPILE_LOCK.release()
    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join()
    assert free, "the compile lock was left held"
