"""recover under torch.distributed: 2 gloo processes on the CPU train the same weights as one process.

Each rank trains on its own contiguous shard of every global batch inside DistributedDataParallel; the
loss of a rank is its samples' sum over the GLOBAL batch, so DDP's mean of the gradients is the one
process gradient and the weights agree to float32 rounding (the sums are grouped differently). With
augment, each global batch is augmented before it is shared, so the ranks still see one process's images.
The processes are forked, so they share the compiled model with the test instead of compiling it again.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mambaprune
from mambaprune import recover
from mambaprune.api import distributed
from mambaprune.models import create_model

SHARED = {}   # what the forked ranks read: the pruned model, the teacher, the data


def train_as_rank(rank: int, world: int, store: str, out: str, batch_size: int, augment: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        assert distributed.rank_and_world() == (rank, world)
        result = recover(SHARED["pruned"], SHARED["teacher"], SHARED["data"], steps=4, lr=3e-3, batch_size=batch_size,
                         seed=0, augment=augment, progress=False)
        torch.save({"state": result.graph_module.state_dict(), "losses": result.report.recovery.losses,
                    "world": result.report.recovery.world_size}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_the_weights_one_process_trains(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10).eval()
    SHARED.update(teacher=teacher, pruned=mambaprune.compile_pruned(teacher, ratio=0.4, alignment="none"),
                  data=torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert distributed.rank_and_world() == (0, 1)
    for batch_size, augment in ((7, "none"), (7, "mixup+shift")):     # shards of 4 and 3 images
        alone = recover(SHARED["pruned"], teacher, SHARED["data"], steps=4, lr=3e-3, batch_size=batch_size, seed=0,
                        augment=augment, progress=False)
        mp.start_processes(train_as_rank, args=(2, str(tmp_path / f"store{augment}"), str(tmp_path), batch_size, augment),
                           nprocs=2, join=True, start_method="fork")
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
        one = alone.graph_module.state_dict()
        moved = max((one[k] - SHARED["pruned"].graph_module.state_dict()[k]).abs().max().item() for k in one)
        diffs = [max((one[k] - rank["state"][k]).abs().max().item() for k in one) for rank in ranks]
        assert moved > 1e-3                         # the training did move the weights ...
        print(f"batch {batch_size}, augment {augment}: weights moved up to {moved:.2e}; 2 processes vs 1: max abs diff {max(diffs):.2e}")
        assert max(diffs) < 1e-5, diffs             # ... and two processes moved them alike
        assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in one)  # DDP keeps ranks equal
        assert ranks[0]["world"] == 2
        assert max(abs(a - b) for a, b in zip(ranks[0]["losses"], alone.report.recovery.losses)) < 1e-5
